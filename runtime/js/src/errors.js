// The runtime's own errors, named as in the Python runtime (runtime/errors.py).
export class EdgeRuntimeError extends Error {
  constructor(message) { super(message); this.name = this.constructor.name; }
}
/** A bundle is missing, corrupt, foreign, of another version, or not signed by the trusted key. */
export class BundleError extends EdgeRuntimeError {}
/** Data given to fit/evaluate/predict has the wrong shape, type, range or size. */
export class InputError extends EdgeRuntimeError {}
/** A checkpoint cannot be written or read back intact. */
export class CheckpointError extends EdgeRuntimeError {}
/** A training step produced a non-finite or exploding loss or parameters. */
export class DivergenceError extends EdgeRuntimeError {}
