/**
 * Shared vectors: the same input through the Python splice (scripts/make_vectors.py, which
 * calls vault_runner's own matching and splice) and through src/regions.ts must give the
 * same bytes. See test/vectors/README.md.
 */
import { existsSync, readFileSync } from "node:fs";
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import type { RegionUpdate } from "../src/protocol";
import { applyChanges, planRegionChanges } from "../src/regions";
import { utf8Surrogatepass } from "../src/sha256";

interface VectorCase {
	name: string;
	text: string;
	updates: RegionUpdate[];
	force: boolean;
	expected: string;
	expected_sha256: string;
	applied: number[];
	unwritten: number[];
	hand_edited: number[];
	problem: boolean;
}

interface VectorFile {
	version: number;
	generator: string;
	seed: number;
	cases: VectorCase[];
}

const path = fileURLToPath(new URL("./vectors/splice-vectors.json", import.meta.url));
const present = existsSync(path);
const file: VectorFile | null = present ? (JSON.parse(readFileSync(path, "utf8")) as VectorFile) : null;

if (!present) {
	console.warn(
		`SKIPPED shared splice vectors: ${path} is missing; generate it from the Python splice with ` +
			"`python obsidian-plugin/scripts/make_vectors.py` (from the repository root, vault_runner installed)",
	);
}

describe.skipIf(!present)("shared vectors from the Python splice", () => {
	it("has the format this test reads", () => {
		expect(file?.version).toBe(1);
		expect(file?.cases.length ?? 0).toBeGreaterThan(0);
	});

	for (const vector of file?.cases ?? []) {
		it(vector.name, () => {
			const plan = planRegionChanges(vector.text, vector.updates, { force: vector.force });
			const out = applyChanges(vector.text, plan.changes);
			expect(out).toBe(vector.expected);
			const digest = createHash("sha256").update(utf8Surrogatepass(out)).digest("hex");
			expect(digest).toBe(vector.expected_sha256);
			expect(plan.problem !== null).toBe(vector.problem);
			expect([...plan.applied].sort((a, b) => a - b)).toEqual(vector.applied);
			expect([...plan.unwritten].sort((a, b) => a - b)).toEqual(vector.unwritten);
			expect([...plan.handEdited].sort((a, b) => a - b)).toEqual(vector.hand_edited);
		});
	}
});
