// The Python runtime's data order, bit for bit: `np.random.default_rng(seed).permutation(n)`,
// i.e. numpy's SeedSequence -> PCG64 (XSL-RR 128/64) -> Fisher-Yates with masked rejection
// sampling (random_interval), as numpy 2.x implements them (numpy/random/bit_generator.pyx, _pcg64/pcg64.h,
// src/distributions/distributions.c, _generator.pyx `_shuffle_int`).
// 128-bit state arithmetic uses BigInt; everything here is plain ECMAScript.

const M32 = 0xffffffffn;
const M64 = (1n << 64n) - 1n;
const M128 = (1n << 128n) - 1n;
const PCG_MULT = (2549297995355413924n << 64n) + 4865540595714422341n;

const INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715, XSHIFT = 16, POOL = 4;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/** numpy.random.SeedSequence(seed).generate_state(nWords, uint32) for a non-negative integer seed. */
export function seedSequenceState(seed, nWords) {
  let e = BigInt(seed);
  if (e < 0n) throw new RangeError("seed must be non-negative");
  const entropy = [];
  do { entropy.push(Number(e & M32)); e >>= 32n; } while (e > 0n);
  const hc = { v: INIT_A };
  const hashmix = (value) => {
    value = (value ^ hc.v) >>> 0;
    hc.v = mul32(hc.v, MULT_A);
    value = mul32(value, hc.v);
    return (value ^ (value >>> XSHIFT)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> XSHIFT)) >>> 0;
  };
  const pool = new Array(POOL);
  for (let i = 0; i < POOL; i++) pool[i] = hashmix(i < entropy.length ? entropy[i] : 0);
  for (let s = 0; s < POOL; s++)
    for (let d = 0; d < POOL; d++) if (s !== d) pool[d] = mix(pool[d], hashmix(pool[s]));
  for (let s = POOL; s < entropy.length; s++)
    for (let d = 0; d < POOL; d++) pool[d] = mix(pool[d], hashmix(entropy[s]));
  const out = new Array(nWords);
  let h = INIT_B;
  for (let i = 0; i < nWords; i++) {
    let v = (pool[i % POOL] ^ h) >>> 0;
    h = mul32(h, MULT_B);
    v = mul32(v, h);
    out[i] = (v ^ (v >>> XSHIFT)) >>> 0;
  }
  return out;
}

/** numpy's PCG64 bit generator seeded as `np.random.default_rng(seed)` seeds it. */
export class PCG64 {
  constructor(seed) {
    const w = seedSequenceState(seed, 8).map(BigInt);
    const u64 = (i) => w[2 * i] | (w[2 * i + 1] << 32n); // little-endian pairs of uint32
    const initstate = (u64(0) << 64n) | u64(1);
    const initseq = (u64(2) << 64n) | u64(3);
    this.state = 0n;
    this.inc = ((initseq << 1n) | 1n) & M128;
    this.#step();
    this.state = (this.state + initstate) & M128;
    this.#step();
    this.buffered = null; // the high half of a 64-bit draw, kept for the next 32-bit one
  }

  #step() { this.state = (this.state * PCG_MULT + this.inc) & M128; }

  next64() {
    this.#step();
    const x = ((this.state >> 64n) ^ this.state) & M64;
    const rot = this.state >> 122n;
    return ((x >> rot) | (x << ((64n - rot) & 63n))) & M64;
  }

  next32() {
    if (this.buffered !== null) { const v = this.buffered; this.buffered = null; return v; }
    const n = this.next64();
    this.buffered = Number(n >> 32n);
    return Number(n & M32);
  }

  /** An integer in [0, max] (numpy's random_interval: masked rejection sampling). */
  interval(max) {
    if (max === 0) return 0;
    if (max > 0xffffffff) throw new RangeError("arrays of more than 2**32 samples are not supported");
    let mask = max;
    mask |= mask >>> 1; mask |= mask >>> 2; mask |= mask >>> 4; mask |= mask >>> 8; mask |= mask >>> 16;
    mask >>>= 0;
    let v;
    while ((v = (this.next32() & mask) >>> 0) > max);
    return v;
  }
}

/** `np.random.default_rng(seed).permutation(n)` as an Int32Array (n < 2**31). */
export function permutation(seed, n) {
  const rng = new PCG64(seed);
  const a = new Int32Array(n);
  for (let i = 0; i < n; i++) a[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = rng.interval(i);
    const t = a[i]; a[i] = a[j]; a[j] = t;
  }
  return a;
}
