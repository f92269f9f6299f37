import assert from "node:assert/strict";
import { test } from "node:test";
import { permutation } from "../src/shuffle.js";
import { python } from "./fixtures.mjs";

test("the data order is numpy's default_rng(seed).permutation(n), bit for bit", () => {
  const cases = [[0, 1], [0, 2], [1, 20], [7, 1257], [12345, 70000], [2 ** 32 + 5, 33]];
  const ref = JSON.parse(python(["-c", `import json, numpy as np; print(json.dumps([np.random.default_rng(s).permutation(n).tolist() for s, n in ${JSON.stringify(cases)}]))`]));
  cases.forEach(([s, n], i) => assert.deepEqual(Array.from(permutation(s, n)), ref[i], `seed ${s}, n ${n}`));
});
