// Types of @edgetl/runtime (the browser-safe core). See README.md.

/** An n-d array as the runtime takes and returns it: row-major data and its shape. */
export interface NdArray<T extends ArrayBufferView = ArrayBufferView> {
  data: T;
  shape: number[];
}

/** Where a bundle's files come from: `read(name)` gives the bytes, or null when there is no such file. */
export interface BundleSource {
  read(name: string): Promise<Uint8Array | null>;
}

/** Where checkpoints live: generations newest first; `write` replaces the newest (keeping the previous one). */
export interface CheckpointStore {
  read(): Promise<Array<{ name: string; bytes: Uint8Array }>>;
  write(bytes: Uint8Array, options?: { keepPrevious?: boolean }): Promise<void>;
}

/** The onnxruntime module in use: onnxruntime-node, onnxruntime-web or onnxruntime-react-native. */
export type OrtModule = { InferenceSession: any; Tensor: any };

export interface Manifest {
  target: string;
  model?: string;
  recipe?: string;
  input: { shape: [number, number, number]; batch_size: number; preprocess: { mean: number[]; std: number[] } };
  num_classes: number;
  programs: Record<string, string>;
  trainable: Array<{ name: string; shape: number[] }>;
  optimizer: { lr: number; state?: Array<{ name: string; shape: number[] }>; [k: string]: unknown };
  state_file: string;
  state_keys: Record<string, string>;
  io: { params: Record<string, string>; state?: Record<string, string> };
  files: Record<string, string>;
  manifest_sha256: string;
  [k: string]: unknown;
}

export class Bundle {
  readonly manifest: Manifest;
  readonly files: Map<string, Uint8Array>;
  readonly target: string;
  readonly batchSize: number;
  /** Samples per call of the train_step program: batchSize, or fewer where the step accumulates micro-batches. */
  readonly microBatch: number;
  readonly inputShape: number[];
  readonly numClasses: number;
  readonly trainable: string[];
  readonly stateNames: string[];
  tensorShapes(): Record<string, number[]>;
  program(role: string): Uint8Array;
  initialState(): Promise<Record<string, Float32Array>>;
}

export function loadBundle(source: BundleSource, options?: { trustedKey?: string | Uint8Array | null; name?: string }): Promise<Bundle>;
export function validateManifest(manifest: Manifest): void;
export function manifestDigest(manifest: object): Promise<string>;
export const MANIFEST: string;
export const FORMAT_VERSION: number;

export interface ProgramSpec {
  role: string; file: string; inputs?: string[]; outputs?: string[];
  static_batch?: boolean; more_inputs?: boolean; more_outputs?: boolean; opaque?: boolean;
}
export interface TargetSpec {
  name: string; summary: string; program_format: "onnx" | "pte"; bind: "name" | "position";
  programs: ProgramSpec[]; files: string[]; optimizer_state: "program" | "ort-checkpoint"; sgd_momentum: boolean;
}
/** The bundle contract (runtime/contract.json, shared with the Python runtime; BUNDLE.md). */
export const CONTRACT: {
  about: string;
  bundle: { format: string; format_version: number; manifest: string; manifest_digest: string; max_manifest_bytes: number; required_fields: string[] };
  state: { format: string; version: number; file: string };
  lora: { format: string; version: number; file: string };
  checkpoint: { format: string; version: number; reads: number[]; schedules: string[]; int_keys: string[]; json_keys: string[] };
  divergence: { loss_growth: number; param_growth: number };
  signature: { format: string; format_version: number; file: string; signed_file: string };
  tensor_names: Record<string, string>;
  targets: TargetSpec[];
};

export interface Progress { step: number; total: number; done: number; epoch: number; loss: number; lr: number; ms: number }

export interface FitOptions {
  epochs?: number;
  lr?: number | null;
  schedule?: "constant" | "cosine";
  seed?: number;
  checkpoint?: CheckpointStore | null;
  checkpointEvery?: number;
  onProgress?: ((p: Progress) => void) | null;
}

export interface FitResult { steps: number; losses: number[]; stepMs: number[]; finalLoss: number | null; stepMsMedian: number | null }

export interface Schedule { name: "constant" | "cosine"; lr: number; total_steps: number; start_step?: number }

export class Trainer {
  static load(source: BundleSource | Bundle, options: { ort: OrtModule; trustedKey?: string | Uint8Array | null; sessionOptions?: object; name?: string }): Promise<Trainer>;
  readonly bundle: Bundle;
  step: number;
  epoch: number;
  seed: number;
  schedule: Schedule;
  /** Called with one-line notices (a resumed checkpoint's lr replaced, a cosine schedule stretched, ...). */
  notice: (message: string) => void;
  lrAt(step: number): number;
  fit(x: NdArray, y: NdArray, options?: FitOptions): Promise<FitResult>;
  /** One optimizer step on a full, already normalized batch. */
  trainStep(x: Float32Array, y: BigInt64Array): Promise<{ loss: number; ms: number }>;
  predictLogits(x: NdArray, chunk?: number | null): Promise<NdArray<Float32Array>>;
  predict(x: NdArray): Promise<Int32Array>;
  evaluate(x: NdArray, y: NdArray): Promise<{ loss: number; accuracy: number; n: number }>;
  getState(): Record<string, Float32Array>;
  setState(state: Record<string, ArrayLike<number>>): void;
  checkpointBytes(): Promise<Uint8Array>;
  loadCheckpoint(store: CheckpointStore | Uint8Array): Promise<void>;
}
export const SCHEDULES: ["constant", "cosine"];
export const DEFAULT_SESSION_OPTIONS: object;

export function encodeCheckpoint(state: Record<string, Float32Array>, shapes: Record<string, number[]>, meta: object): Promise<Uint8Array>;
export function decodeCheckpoint(bytes: Uint8Array, name?: string): Promise<{ arrays: Record<string, NdArray<Float32Array | Float64Array>>; header: any }>;
export interface SafetensorsEntry { name: string; dtype: string; shape: number[]; begin: number; end: number }
/** Version 4's checksum over `__metadata__` (less sha256), the tensor table and the data section (docs/bundle-state.md). */
export function checkpointDigest(metadata: Record<string, string>, entries: SafetensorsEntry[], data: Uint8Array): Promise<string>;
export function encodeSafetensors(tensors: Record<string, { dtype: string; shape: number[]; data: ArrayBufferView }>, metadata?: Record<string, string> | null): Uint8Array;
export function readSafetensorsHeader(bytes: Uint8Array): { entries: SafetensorsEntry[]; metadata: Record<string, string>; start: number };
/** Entry `e`'s values as a new Float32Array (F16, F32, F64; null for other dtypes). */
export function floatTensor(bytes: Uint8Array, start: number, e: SafetensorsEntry): Float32Array | null;
export class SafetensorsError extends Error {}

export function checkImages(x: NdArray, shape: number[], what?: string): NdArray<Float32Array>;
export function checkLabels(y: NdArray, n: number, numClasses: number, what?: string): NdArray<BigInt64Array>;
export function normalize(x: NdArray<Float32Array>, manifest: Manifest): NdArray<Float32Array>;
export function datasetFromNpz(arrays: Record<string, any>, name?: string): Record<"x_train" | "y_train" | "x_test" | "y_test", NdArray>;
export function readNpz(bytes: Uint8Array, options?: { maxBytes?: number }): Promise<Record<string, { dtype: string; kind: string; shape: number[]; data: ArrayBufferView | string[] | null }>>;
export class NpzError extends Error {}

/** `np.random.default_rng(seed).permutation(n)`, bit for bit. */
export function permutation(seed: number | bigint, n: number): Int32Array;
export class PCG64 { constructor(seed: number | bigint); next64(): bigint; next32(): number; interval(max: number): number }

export function verifySignature(manifest: Uint8Array, signature: Uint8Array | null, trustedKey: string | Uint8Array): Promise<void>;
export function sha256Hex(bytes: Uint8Array): Promise<string>;
export function fetchSource(baseUrl: string, options?: { fetch?: typeof fetch }): BundleSource;

export class EdgeRuntimeError extends Error {}
export class BundleError extends EdgeRuntimeError {}
export class InputError extends EdgeRuntimeError {}
export class CheckpointError extends EdgeRuntimeError {}
export class DivergenceError extends EdgeRuntimeError {}
export class SigningKeyError extends EdgeRuntimeError {}
