// Tensors an ONNX program keeps in external files, read from the protobuf wire format before
// onnxruntime opens it (a port of runtime/onnx_proto.py's check): onnxruntime would read any path
// such a tensor names, and no checksum covers that file, so the runtime refuses it.
// Field numbers are those of onnx.proto (ONNX 1.17).

const MAX_DEPTH = 64;
const [MODEL, GRAPH, NODE, ATTR, TENSOR, SPARSE, FUNCTION, TRAINING] = [0, 1, 2, 3, 4, 5, 6, 7];
const CHILDREN = {
  [MODEL]: { 7: GRAPH, 20: TRAINING, 25: FUNCTION },
  [GRAPH]: { 1: NODE, 5: TENSOR, 15: SPARSE },
  [NODE]: { 5: ATTR },
  [ATTR]: { 5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE },
  [SPARSE]: { 1: TENSOR, 2: TENSOR },
  [FUNCTION]: { 7: NODE, 11: ATTR },
  [TRAINING]: { 1: GRAPH, 2: GRAPH },
  [TENSOR]: {},
};
const TENSOR_NAME = 8, TENSOR_EXTERNAL_DATA = 13, TENSOR_DATA_LOCATION = 14, EXTERNAL = 1;

export class ProtoError extends Error {}

function varint(b, i) {
  let result = 0, mul = 1;
  for (let shift = 0; ; shift += 7) {
    if (i >= b.length || shift > 63) throw new ProtoError("truncated or overlong varint");
    const x = b[i++];
    result += (x & 0x7f) * mul; // exact up to 2**53; larger values only matter as lengths, which then fail
    mul *= 128;
    if (x < 0x80) return [result, i];
  }
}

/** [field number, wire type, value (a number, or a Uint8Array for length-delimited fields)] of one message. */
export function* fields(b) {
  let i = 0;
  while (i < b.length) {
    let key;
    [key, i] = varint(b, i);
    const num = Math.floor(key / 8), wire = key % 8;
    if (num === 0) throw new ProtoError("field number 0");
    if (wire === 0) { let v; [v, i] = varint(b, i); yield [num, wire, v]; }
    else if (wire === 1 || wire === 5) {
      const w = wire === 1 ? 8 : 4;
      if (i + w > b.length) throw new ProtoError("truncated fixed-width field");
      let v = 0;
      for (let k = w - 1; k >= 0; k--) v = v * 256 + b[i + k];
      i += w;
      yield [num, wire, v];
    } else if (wire === 2) {
      let len;
      [len, i] = varint(b, i);
      if (i + len > b.length) throw new ProtoError("length-delimited field runs past the end");
      yield [num, wire, b.subarray(i, i + len)];
      i += len;
    } else throw new ProtoError(`unsupported wire type ${wire}`);
  }
}

/** Names of the tensors whose data an ONNX model (bytes) keeps outside itself; ProtoError if it is not protobuf. */
export function externalTensors(bytes) {
  const found = [];
  const walk = (b, kind, depth) => {
    if (depth > MAX_DEPTH) throw new ProtoError(`graphs nested deeper than ${MAX_DEPTH}`);
    if (kind === TENSOR) {
      let name = "", external = false;
      for (const [num, wire, value] of fields(b)) {
        if (num === TENSOR_NAME && wire === 2) name = new TextDecoder().decode(value);
        else if (num === TENSOR_EXTERNAL_DATA) external = true;
        else if (num === TENSOR_DATA_LOCATION && value === EXTERNAL) external = true;
      }
      if (external) found.push(name || "<unnamed>");
      return;
    }
    const children = CHILDREN[kind];
    for (const [num, wire, value] of fields(b)) {
      const child = children[num];
      if (child !== undefined) {
        if (wire !== 2) throw new ProtoError(`field ${num} should be a message`);
        walk(value, child, depth + 1);
      }
    }
  };
  walk(bytes, MODEL, 0);
  return found;
}
