import type { Bundle, BundleSource, CheckpointStore, NdArray, OrtModule, Trainer } from "./index.js";

export function dirSource(dir: string): BundleSource;
export function loadBundleFromDir(dir: string, options?: { trustedKey?: string | Uint8Array | null }): Promise<Bundle>;
export function ortModule(kind?: "node" | "web"): Promise<OrtModule>;
export function loadTrainer(dir: string, options?: { backend?: "node" | "web"; trustedKey?: string | Uint8Array | null; sessionOptions?: object }): Promise<Trainer>;
export function loadDataFile(file: string): Promise<Record<"x_train" | "y_train" | "x_test" | "y_test", NdArray>>;
export function fileCheckpointStore(file: string): CheckpointStore & { file: string };
