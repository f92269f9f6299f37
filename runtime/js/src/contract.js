// Generated from runtime/contract.json by `node scripts/contract.mjs` (in runtime/js): do not edit.
// The bundle contract's facts (formats, versions, file and tensor names, targets), shared with
// the Python runtime, which reads the JSON; BUNDLE.md describes them.
export const CONTRACT = {
  "about": "The bundle contract's facts, stated once for every device runtime (BUNDLE.md describes them). runtime/targets.py builds its TargetSpecs from this file; runtime/js/src/contract.js is generated from it (node runtime/js/scripts/contract.mjs) and tests on both sides fail when the two differ.",
  "bundle": {
    "format": "edgetl-bundle",
    "format_version": 1,
    "manifest": "manifest.json",
    "manifest_digest": "manifest_sha256",
    "max_manifest_bytes": 16777216,
    "required_fields": [
      "target",
      "input",
      "num_classes",
      "programs",
      "trainable",
      "optimizer",
      "state_file",
      "state_keys",
      "files"
    ]
  },
  "state": {
    "format": "edgetl-state",
    "version": 1,
    "file": "state.safetensors"
  },
  "lora": {
    "format": "edgetl-lora",
    "version": 1,
    "file": "lora.safetensors"
  },
  "checkpoint": {
    "format": "edgetl-checkpoint",
    "version": 4,
    "reads": [
      3,
      4
    ],
    "schedules": [
      "constant",
      "cosine"
    ],
    "int_keys": [
      "version",
      "step",
      "epoch",
      "seed"
    ],
    "json_keys": [
      "schedule",
      "bundle"
    ]
  },
  "divergence": {
    "loss_growth": 10,
    "param_growth": 1000
  },
  "signature": {
    "format": "edgetl-signature",
    "format_version": 1,
    "file": "manifest.sig",
    "signed_file": "manifest.json"
  },
  "tensor_names": {
    "x": "x",
    "y": "y",
    "lr": "lr",
    "loss": "loss",
    "logits": "logits",
    "params": "param.*",
    "state": "state.*",
    "new_params": "new_param.*",
    "new_state": "new_state.*",
    "ort_labels": "labels",
    "param_prefix": "param.",
    "state_prefix": "state.",
    "new_prefix": "new_"
  },
  "targets": [
    {
      "name": "onnx",
      "summary": "the lean step as one ONNX model, run by onnxruntime's InferenceSession (any build)",
      "program_format": "onnx",
      "bind": "name",
      "programs": [
        {
          "role": "train_step",
          "file": "train_step.onnx",
          "inputs": [
            "x",
            "y",
            "lr",
            "param.*",
            "state.*"
          ],
          "outputs": [
            "loss",
            "logits",
            "new_param.*",
            "new_state.*"
          ],
          "static_batch": true
        },
        {
          "role": "eval",
          "file": "eval.onnx",
          "inputs": [
            "x",
            "param.*"
          ],
          "outputs": [
            "logits"
          ]
        }
      ],
      "files": [],
      "optimizer_state": "program",
      "sgd_momentum": true,
      "micro_batches": true
    },
    {
      "name": "ort-training",
      "summary": "ONNX Runtime's on-device training artifacts (Module, Optimizer, CheckpointState)",
      "program_format": "onnx",
      "bind": "name",
      "programs": [
        {
          "role": "training",
          "file": "training_model.onnx",
          "inputs": [
            "x",
            "labels",
            "param.*"
          ],
          "outputs": [
            "loss",
            "logits"
          ],
          "more_inputs": true,
          "more_outputs": true
        },
        {
          "role": "eval",
          "file": "eval_model.onnx",
          "inputs": [
            "x",
            "labels",
            "param.*"
          ],
          "outputs": [
            "loss",
            "logits"
          ],
          "more_inputs": true
        },
        {
          "role": "optimizer",
          "file": "optimizer_model.onnx",
          "opaque": true
        }
      ],
      "files": [
        "checkpoint"
      ],
      "optimizer_state": "ort-checkpoint",
      "sgd_momentum": false,
      "micro_batches": false
    },
    {
      "name": "executorch",
      "summary": "the lean step as a memory-planned ExecuTorch .pte, run by ExecuTorch's C++ runtime",
      "program_format": "pte",
      "bind": "position",
      "programs": [
        {
          "role": "train_step",
          "file": "train_step.pte",
          "inputs": [
            "x",
            "y",
            "lr",
            "param.*",
            "state.*"
          ],
          "outputs": [
            "loss",
            "logits",
            "new_param.*",
            "new_state.*"
          ],
          "static_batch": true
        },
        {
          "role": "eval",
          "file": "eval.pte",
          "inputs": [
            "x",
            "param.*"
          ],
          "outputs": [
            "logits"
          ],
          "static_batch": true
        }
      ],
      "files": [],
      "optimizer_state": "program",
      "sgd_momentum": true,
      "micro_batches": true
    }
  ]
};
