// .npz archives (a zip of .npy arrays, as numpy's savez writes them) in plain JavaScript: no
// native code and no Node API, so browsers and React Native read bundles the same way.
// Only numeric dtypes are decoded; object (pickled) arrays are listed so callers can refuse them,
// and never decoded. Every declared size is checked against the bytes actually there.

const DTYPES = {
  f4: Float32Array, f8: Float64Array, i1: Int8Array, i2: Int16Array, i4: Int32Array, i8: BigInt64Array,
  u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, u8: BigUint64Array, b1: Uint8Array,
};
const MAX_MEMBERS = 4096;
const MAX_HEADER_BYTES = 10000;

/** An .npz/.npy problem; the message is a verb phrase that leaves the file's name to the caller. */
export class NpzError extends Error {}

// A plain Uint8Array view (a Node Buffer's slice() does not copy, a Uint8Array's does).
const asBytes = (b) => (b instanceof Uint8Array && b.constructor === Uint8Array ? b : new Uint8Array(b.buffer ?? b, b.byteOffset ?? 0, b.byteLength));

const u16 = (b, o) => b[o] | (b[o + 1] << 8);
const u32 = (b, o) => (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;
const u64 = (b, o) => u32(b, o) + u32(b, o + 4) * 2 ** 32;

let CRC_TABLE;
export function crc32(bytes) {
  if (!CRC_TABLE) {
    CRC_TABLE = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      CRC_TABLE[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** The members of a zip archive: [{name, method, size, compressedSize, offset (of the data), crc}]. */
export function zipEntries(bytes) {
  const b = bytes;
  let eocd = -1;
  for (let i = b.length - 22; i >= Math.max(0, b.length - 22 - 65535); i--) {
    if (u32(b, i) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) throw new NpzError("is not a readable .npz archive (no zip directory)");
  let count = u16(b, eocd + 10);
  let cdOffset = u32(b, eocd + 16);
  if (cdOffset === 0xffffffff || count === 0xffff) { // zip64 end of central directory
    const loc = eocd - 20;
    if (loc < 0 || u32(b, loc) !== 0x07064b50) throw new NpzError("is not a readable .npz archive (bad zip64 directory)");
    const z64 = u64(b, loc + 8);
    if (z64 + 56 > b.length || u32(b, z64) !== 0x06064b50) throw new NpzError("is not a readable .npz archive (bad zip64 directory)");
    count = u64(b, z64 + 32);
    cdOffset = u64(b, z64 + 48);
  }
  if (count > MAX_MEMBERS) throw new NpzError(`has ${count} members; an .npz of arrays has far fewer`);
  const out = [];
  let p = cdOffset;
  const dec = new TextDecoder();
  for (let n = 0; n < count; n++) {
    if (p + 46 > b.length || u32(b, p) !== 0x02014b50) throw new NpzError("is not a readable .npz archive (bad zip directory)");
    const flags = u16(b, p + 8), method = u16(b, p + 10), crc = u32(b, p + 16);
    let compressedSize = u32(b, p + 20), size = u32(b, p + 24);
    const nameLen = u16(b, p + 28), extraLen = u16(b, p + 30), commentLen = u16(b, p + 32);
    let local = u32(b, p + 42);
    const name = dec.decode(b.subarray(p + 46, p + 46 + nameLen));
    let e = p + 46 + nameLen;
    const eEnd = e + extraLen;
    while (e + 4 <= eEnd) { // zip64 extended information: the fields that were 0xffffffff, in order
      const id = u16(b, e), len = u16(b, e + 2);
      if (id === 1) {
        let q = e + 4;
        if (size === 0xffffffff) { size = u64(b, q); q += 8; }
        if (compressedSize === 0xffffffff) { compressedSize = u64(b, q); q += 8; }
        if (local === 0xffffffff) { local = u64(b, q); q += 8; }
      }
      e += 4 + len;
    }
    if (flags & 1) throw new NpzError(`has an encrypted member '${name.slice(0, 80)}'`);
    if (local + 30 > b.length || u32(b, local) !== 0x04034b50) throw new NpzError("is not a readable .npz archive (bad member header)");
    const offset = local + 30 + u16(b, local + 26) + u16(b, local + 28);
    if (offset + compressedSize > b.length) throw new NpzError("is not a readable .npz archive (truncated)");
    out.push({ name, method, size, compressedSize, offset, crc });
    p = eEnd + commentLen;
  }
  return out;
}

async function inflateRaw(data) {
  if (typeof DecompressionStream !== "function") {
    throw new NpzError("is compressed (savez_compressed) and this JavaScript engine has no DecompressionStream; save it with np.savez");
  }
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

/** The .npy header of `bytes`: {dtype ('<f4', '|O', ...), shape, fortran, offset, itemsize, kind}. */
export function npyHeader(bytes, name = "array") {
  if (bytes.length < 10 || bytes[0] !== 0x93 || new TextDecoder().decode(bytes.subarray(1, 6)) !== "NUMPY") {
    throw new NpzError(`has a member '${name}' that is not an .npy array`);
  }
  const major = bytes[6];
  let len, start;
  if (major === 1) { len = u16(bytes, 8); start = 10; }
  else if (major === 2 || major === 3) { len = u32(bytes, 8); start = 12; }
  else throw new NpzError(`has an array '${name}' of an unsupported .npy version ${major}`);
  if (len > MAX_HEADER_BYTES || start + len > bytes.length) throw new NpzError(`has an array '${name}' with a corrupt header`);
  const h = new TextDecoder().decode(bytes.subarray(start, start + len));
  const descr = /'descr':\s*'([^']*)'/.exec(h);
  const fortran = /'fortran_order':\s*(True|False)/.exec(h);
  const shape = /'shape':\s*\(([^)]*)\)/.exec(h);
  if (!descr) {
    if (/'descr':\s*\[/.test(h)) return { dtype: "|V", kind: "V", shape: [], offset: start + len, itemsize: 0, fortran: false };
    throw new NpzError(`has an array '${name}' with a corrupt header`);
  }
  if (!fortran || !shape) throw new NpzError(`has an array '${name}' with a corrupt header`);
  const dims = shape[1].split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
  if (!dims.every((d) => Number.isSafeInteger(d) && d >= 0)) throw new NpzError(`has an array '${name}' of an invalid shape (${shape[1]})`);
  const dt = descr[1];
  const m = /^([<>|=])([a-zA-Z])(\d*)$/.exec(dt);
  const kind = m ? m[2] : "?";
  const itemsize = m && m[3] ? Number(m[3]) * (kind === "U" ? 4 : 1) : 0;
  return { dtype: dt, kind, shape: dims, fortran: fortran[1] === "True", offset: start + len, itemsize };
}

/**
 * An .npz's arrays: {name: {dtype, kind, shape, data}} (data a typed array, or null for dtypes not
 * decoded: object/pickled 'O', strings, structured). `maxBytes` bounds the declared total size,
 * checked before anything is inflated or copied.
 */
export async function readNpz(bytes, { maxBytes = Infinity } = {}) {
  bytes = asBytes(bytes);
  const entries = zipEntries(bytes);
  const total = entries.reduce((s, e) => s + e.size, 0);
  if (total > maxBytes) throw new NpzError(`would inflate to ${(total / 1e6).toFixed(1)} MB, more than the ${(maxBytes / 1e6).toFixed(1)} MB allowed`);
  const out = {};
  for (const e of entries) {
    if (!e.name.endsWith(".npy")) throw new NpzError(`holds '${e.name.slice(0, 80)}', which is not an .npy array`);
    const name = e.name.slice(0, -4);
    let raw = bytes.subarray(e.offset, e.offset + e.compressedSize);
    if (e.method === 8) raw = await inflateRaw(raw);
    else if (e.method !== 0) throw new NpzError(`has a member '${name}' compressed with an unsupported method ${e.method}`);
    if (raw.length !== e.size || crc32(raw) !== e.crc) throw new NpzError(`has a member '${name}' that fails its CRC; the archive is corrupt`);
    out[name] = decodeNpy(raw, name);
  }
  return out;
}

/** One .npy array: {dtype, kind, shape, data}; data null where the dtype is not numeric. */
export function decodeNpy(raw, name = "array") {
  raw = asBytes(raw);
  const h = npyHeader(raw, name);
  const n = h.shape.reduce((a, d) => a * d, 1);
  const typeKey = h.kind + String(h.itemsize);
  const Ctor = DTYPES[h.kind === "?" ? "" : typeKey];
  if (h.kind === "U" && h.itemsize && h.offset + n * h.itemsize <= raw.length) {
    const chars = [];
    for (let i = 0; i < n * h.itemsize; i += 4) chars.push(u32(raw, h.offset + i));
    const strings = [];
    const per = h.itemsize / 4;
    for (let k = 0; k < n; k++) {
      let s = String.fromCodePoint(...chars.slice(k * per, (k + 1) * per));
      strings.push(s.replace(/\0+$/, ""));
    }
    return { dtype: h.dtype, kind: "U", shape: h.shape, data: strings };
  }
  if (!Ctor || !["f", "i", "u", "b"].includes(h.kind)) return { dtype: h.dtype, kind: h.kind, shape: h.shape, data: null };
  if (h.dtype[0] === ">" && h.itemsize > 1) throw new NpzError(`has a big-endian array '${name}', which is not supported`);
  const nbytes = n * h.itemsize;
  if (h.offset + nbytes > raw.length) {
    throw new NpzError(`has an array '${name}' that declares shape (${h.shape}) (${(nbytes / 1e6).toFixed(1)} MB) but its member holds only ${((raw.length - h.offset) / 1e6).toFixed(1)} MB; the archive is corrupt`);
  }
  const copy = raw.slice(h.offset, h.offset + nbytes); // aligned, owned
  let data = new Ctor(copy.buffer, 0, n);
  if (h.fortran && h.shape.length > 1) data = fromFortran(data, h.shape);
  return { dtype: h.dtype, kind: h.kind, shape: h.shape, data };
}

function fromFortran(data, shape) {
  const out = new data.constructor(data.length);
  const nd = shape.length;
  const idx = new Array(nd).fill(0);
  for (let c = 0; c < data.length; c++) {
    let f = 0, mul = 1;
    for (let k = 0; k < nd; k++) { f += idx[k] * mul; mul *= shape[k]; }
    out[c] = data[f];
    for (let k = nd - 1; k >= 0; k--) { if (++idx[k] < shape[k]) break; idx[k] = 0; }
  }
  return out;
}

function npyBytes(descr, shape, payload) {
  const shp = shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': ${shp}, }`;
  const pad = 64 - ((10 + header.length + 1) % 64);
  header = header + " ".repeat(pad % 64) + "\n";
  const out = new Uint8Array(10 + header.length + payload.length);
  out.set([0x93, ...new TextEncoder().encode("NUMPY"), 1, 0, header.length & 0xff, header.length >> 8]);
  out.set(new TextEncoder().encode(header), 10);
  out.set(payload, 10 + header.length);
  return out;
}

/** A float32 array as .npy bytes. */
export function npyFloat32(data, shape) {
  const f = Float32Array.from(data);
  return npyBytes("<f4", shape, new Uint8Array(f.buffer));
}

/** A 0-d numpy unicode string array ('<U{n}', UTF-32LE) as .npy bytes: how np.array(str) saves. */
export function npyString(s) {
  const cps = Array.from(s, (c) => c.codePointAt(0));
  const u = new Uint32Array(Math.max(cps.length, 1));
  u.set(cps);
  return npyBytes(`<U${Math.max(cps.length, 1)}`, [], new Uint8Array(u.buffer));
}

/** A zip of stored (uncompressed) members {name: bytes}, as np.savez writes it. */
export function writeZip(members) {
  const enc = new TextEncoder();
  const parts = [], central = [];
  let offset = 0;
  for (const [name, data] of Object.entries(members)) {
    const nb = enc.encode(name), crc = crc32(data);
    const local = new Uint8Array(30 + nb.length);
    const dv = new DataView(local.buffer);
    dv.setUint32(0, 0x04034b50, true); dv.setUint16(4, 20, true); dv.setUint16(8, 0, true);
    dv.setUint16(10, 0, true); dv.setUint16(12, 0, true);
    dv.setUint32(14, crc, true); dv.setUint32(18, data.length, true); dv.setUint32(22, data.length, true);
    dv.setUint16(26, nb.length, true); dv.setUint16(28, 0, true);
    local.set(nb, 30);
    const c = new Uint8Array(46 + nb.length);
    const cv = new DataView(c.buffer);
    cv.setUint32(0, 0x02014b50, true); cv.setUint16(4, 20, true); cv.setUint16(6, 20, true);
    cv.setUint32(16, crc, true); cv.setUint32(20, data.length, true); cv.setUint32(24, data.length, true);
    cv.setUint16(28, nb.length, true); cv.setUint32(42, offset, true);
    c.set(nb, 46);
    parts.push(local, data); central.push(c);
    offset += local.length + data.length;
  }
  const cdSize = central.reduce((s, c) => s + c.length, 0);
  const end = new Uint8Array(22);
  const ev = new DataView(end.buffer);
  ev.setUint32(0, 0x06054b50, true); ev.setUint16(8, central.length, true); ev.setUint16(10, central.length, true);
  ev.setUint32(12, cdSize, true); ev.setUint32(16, offset, true);
  const all = [...parts, ...central, end];
  const out = new Uint8Array(all.reduce((s, p) => s + p.length, 0));
  let p = 0;
  for (const a of all) { out.set(a, p); p += a.length; }
  return out;
}
