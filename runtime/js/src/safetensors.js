// safetensors in plain JavaScript (no Node API), as runtime/safetensors.py reads and writes it:
// an 8-byte little-endian header length N, N bytes of JSON ({name: {dtype, shape, data_offsets},
// "__metadata__": {string: string}}, padded with spaces to 8 bytes), then the tensors' raw
// little-endian bytes back to back. Every declared size is checked against the bytes there.

export const METADATA = "__metadata__";
const MAX_HEADER_BYTES = 16 << 20;
const MAX_DIMS = 8;
const ITEMSIZE = { F16: 2, F32: 4, F64: 8, I8: 1, U8: 1, I16: 2, I32: 4, I64: 8, BOOL: 1 };

/** A safetensors problem; the message is a verb phrase that leaves the file's name to the caller. */
export class SafetensorsError extends Error {}

const bytesOf = (b) => (b instanceof Uint8Array && b.constructor === Uint8Array ? b : new Uint8Array(b.buffer ?? b, b.byteOffset ?? 0, b.byteLength));
const short = (v) => String(v).slice(0, 80);
const count = (shape) => shape.reduce((a, b) => a * b, 1);

/** The bytes of `tensors` ({name: {dtype: "F32", shape, data: TypedArray}}, in order) with `metadata` (strings). */
export function encodeSafetensors(tensors, metadata = null) {
  const header = {};
  if (metadata) header[METADATA] = { ...metadata };
  let offset = 0;
  const blobs = [];
  for (const [name, t] of Object.entries(tensors)) {
    if (name === METADATA) throw new Error(`a tensor cannot be named ${METADATA}`);
    const raw = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength); // little-endian engines only
    header[name] = { dtype: t.dtype, shape: t.shape.slice(), data_offsets: [offset, offset + raw.length] };
    blobs.push(raw);
    offset += raw.length;
  }
  let text = new TextEncoder().encode(JSON.stringify(header));
  const pad = (8 - (text.length % 8)) % 8;
  const out = new Uint8Array(8 + text.length + pad + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(text.length + pad), true);
  out.set(text, 8);
  out.fill(0x20, 8 + text.length, 8 + text.length + pad);
  let o = 8 + text.length + pad;
  for (const b of blobs) { out.set(b, o); o += b.length; }
  return out;
}

/**
 * {entries: [{name, dtype, shape, begin, end}] in data order, metadata, start (of the data section)}
 * of safetensors bytes, checked as runtime/safetensors.py checks them.
 */
export function readSafetensorsHeader(input) {
  const bytes = bytesOf(input);
  if (bytes.length < 8) throw new SafetensorsError(`is truncated (${bytes.length} bytes; a safetensors file starts with an 8-byte header length)`);
  const n64 = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
  if (n64 > BigInt(MAX_HEADER_BYTES)) throw new SafetensorsError(`declares a header of ${n64} bytes, more than the ${MAX_HEADER_BYTES} allowed; it is not a safetensors file`);
  const n = Number(n64);
  if (8 + n > bytes.length) throw new SafetensorsError(`declares a header of ${n} bytes, beyond the file's ${bytes.length} bytes (truncated?)`);
  let header;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + n)));
  } catch {
    throw new SafetensorsError("has a header that is not JSON; it is not a safetensors file");
  }
  if (!header || typeof header !== "object" || Array.isArray(header)) throw new SafetensorsError("has a header that is not a JSON object");
  const metadata = header[METADATA] ?? {};
  delete header[METADATA];
  if (!metadata || typeof metadata !== "object" || Array.isArray(metadata) || !Object.values(metadata).every((v) => typeof v === "string")) {
    throw new SafetensorsError(`has '${METADATA}' that does not map names to strings`);
  }
  const ints = (v) => Array.isArray(v) && v.every((d) => Number.isSafeInteger(d) && d >= 0);
  const entries = [];
  for (const [name, e] of Object.entries(header)) {
    if (!e || typeof e !== "object" || Object.keys(e).sort().join() !== "data_offsets,dtype,shape") throw new SafetensorsError(`has an invalid entry for tensor '${short(name)}'`);
    const { dtype, shape, data_offsets: off } = e;
    if (!Object.hasOwn(ITEMSIZE, dtype)) throw new SafetensorsError(`has tensor '${short(name)}' of dtype ${JSON.stringify(short(dtype))}, which this runtime does not read`);
    if (!ints(shape) || shape.length > MAX_DIMS) throw new SafetensorsError(`has tensor '${short(name)}' of an invalid shape ${short(JSON.stringify(shape))}`);
    if (!ints(off) || off.length !== 2 || off[0] > off[1]) throw new SafetensorsError(`has tensor '${short(name)}' with invalid data_offsets ${short(JSON.stringify(off))}`);
    if (off[1] - off[0] !== count(shape) * ITEMSIZE[dtype]) throw new SafetensorsError(`has tensor '${short(name)}' whose data_offsets do not match its dtype and shape`);
    entries.push({ name, dtype, shape: shape.slice(), begin: off[0], end: off[1] });
  }
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  const start = 8 + n, size = bytes.length - start;
  let at = 0;
  for (const e of entries) {
    if (e.begin !== at) throw new SafetensorsError(`has tensor '${short(e.name)}' that overlaps another or leaves a gap before it`);
    at = e.end;
  }
  if (at > size) throw new SafetensorsError(`declares ${at} bytes of tensor data but holds ${size} (truncated?)`);
  if (at !== size) throw new SafetensorsError(`holds ${size - at} bytes after its last tensor`);
  return { entries, metadata, start };
}

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

/** Entry `e`'s values as a new Float32Array (F16, F32, F64 only; null for other dtypes). */
export function floatTensor(input, start, e) {
  const bytes = bytesOf(input);
  const n = count(e.shape);
  const view = new DataView(bytes.buffer, bytes.byteOffset + start + e.begin, e.end - e.begin);
  const out = new Float32Array(n);
  if (e.dtype === "F32") for (let i = 0; i < n; i++) out[i] = view.getFloat32(4 * i, true);
  else if (e.dtype === "F64") for (let i = 0; i < n; i++) out[i] = view.getFloat64(8 * i, true);
  else if (e.dtype === "F16") for (let i = 0; i < n; i++) out[i] = halfToFloat(view.getUint16(2 * i, true));
  else return null;
  return out;
}
