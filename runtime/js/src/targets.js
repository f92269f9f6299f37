// The target registry and tensor naming scheme (runtime/targets.py), from the bundle contract's
// one source (contract.js, generated from runtime/contract.json).
import { CONTRACT } from "./contract.js";

const N = CONTRACT.tensor_names;
export const NAMES = N;
export const TARGET_SPECS = Object.fromEntries(CONTRACT.targets.map((t) => [t.name, t]));
export const TARGET_NAMES = CONTRACT.targets.map((t) => t.name);

export const paramName = (i) => `${N.param_prefix}${i}`;
export const stateName = (i) => `${N.state_prefix}${i}`;
export const newName = (name) => `${N.new_prefix}${name}`;

/** The spec of `role` in target `target` (programs[].role). */
export function programSpec(target, role) {
  const p = TARGET_SPECS[target]?.programs.find((q) => q.role === role);
  if (!p) throw new Error(`the contract has no '${role}' program for target '${target}'`);
  return p;
}

/** A spec's names (`inputs` or `outputs`) made concrete: `param.*`/`state.*` become the programs' names of the parameters and state, `new_param.*`/`new_state.*` those names with `new_`. */
export function expandNames(names, params, state) {
  const groups = { [N.params]: params, [N.state]: state, [N.new_params]: params.map(newName), [N.new_state]: state.map(newName) };
  return (names ?? []).flatMap((n) => groups[n] ?? [n]);
}
