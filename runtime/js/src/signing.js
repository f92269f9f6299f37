// Ed25519 signature of manifest.json with a trusted public key, as runtime/signing.py checks it,
// on WebCrypto (`crypto.subtle`): Node >= 20, Chrome >= 137, Firefox >= 129, Safari >= 17.
// Engines without WebCrypto Ed25519 (older browsers, React Native without a polyfill) refuse
// a trusted key with a clear error instead of skipping the check.
import { CONTRACT } from "./contract.js";
import { BundleError, EdgeRuntimeError } from "./errors.js";

export const { file: SIGNATURE, format: SIGNATURE_FORMAT, format_version: SIGNATURE_VERSION } = CONTRACT.signature;

export class SigningKeyError extends EdgeRuntimeError {}

const subtle = () => {
  const s = globalThis.crypto && globalThis.crypto.subtle;
  if (!s) throw new EdgeRuntimeError("this JavaScript engine has no WebCrypto (crypto.subtle); it cannot verify bundles");
  return s;
};

export const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

export async function sha256Hex(bytes) {
  return hex(await subtle().digest("SHA-256", bytes));
}

function b64decode(s) {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length % 4) throw new Error("not base64");
  const bin = atob(s);
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

/** The raw 32-byte Ed25519 public key of a PEM SubjectPublicKeyInfo (`edgetl keygen`'s *.pub), or raw bytes. */
export function rawPublicKey(key) {
  if (key instanceof Uint8Array && key.length === 32) return key;
  const text = typeof key === "string" ? key : new TextDecoder().decode(key);
  const m = /-----BEGIN PUBLIC KEY-----([\s\S]*?)-----END PUBLIC KEY-----/.exec(text);
  let der;
  try { der = m && b64decode(m[1].replace(/\s+/g, "")); } catch { der = null; }
  // SPKI of Ed25519: 30 2a 30 05 06 03 2b 65 70 03 21 00 || 32 key bytes
  const prefix = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
  if (!der || der.length !== 44 || !prefix.every((b, i) => der[i] === b)) {
    throw new SigningKeyError("the trusted key is not an Ed25519 PEM public key (the *.pub of `edgetl keygen`)");
  }
  return der.subarray(12);
}

/** BundleError unless `signatureBytes` (manifest.sig, or null) signs `manifestBytes` with `trustedKey`. */
export async function verifySignature(manifestBytes, signatureBytes, trustedKey) {
  const raw = rawPublicKey(trustedKey);
  if (signatureBytes == null) {
    throw new BundleError(`the bundle is not signed (no ${SIGNATURE}) and a trusted key is configured; export it with --sign-key`);
  }
  let doc, sig;
  try {
    doc = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(signatureBytes));
    const ok = doc && typeof doc === "object" && doc.format === SIGNATURE_FORMAT && doc.format_version === SIGNATURE_VERSION &&
      doc.algorithm === "ed25519" && doc.signed_file === CONTRACT.signature.signed_file && typeof doc.signature === "string";
    sig = ok ? b64decode(doc.signature) : null;
  } catch { sig = null; }
  if (!sig || sig.length !== 64) throw new BundleError(`${SIGNATURE} is not a valid edgetl signature file`);
  const trusted = (await sha256Hex(raw)).slice(0, 16);
  if (doc.key_id !== trusted) {
    throw new BundleError(`the bundle is signed by another key (key id '${String(doc.key_id).slice(0, 16)}'), not the trusted key (${trusted})`);
  }
  let key;
  try {
    key = await subtle().importKey("raw", raw, { name: "Ed25519" }, false, ["verify"]);
  } catch (e) {
    throw new SigningKeyError(`this JavaScript engine cannot verify Ed25519 signatures (${e.message}); signed bundles need WebCrypto Ed25519`);
  }
  if (!(await subtle().verify({ name: "Ed25519" }, key, sig, manifestBytes))) {
    throw new BundleError("the bundle's signature does not match its manifest.json: the manifest was altered after signing");
  }
}
