/**
 * Property tests of the pure region logic (src/regions.ts). The byte-for-byte agreement with
 * the Python splice is test/vectors.test.ts; these check the contracts on their own.
 */
import { createHash } from "node:crypto";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import type { RegionUpdate } from "../src/protocol";
import {
	applyChanges,
	blockAtLine,
	isRunnable,
	parseNote,
	planRegionChanges,
	regionChecksum,
	regionLines,
	splitLines,
	trimChange,
} from "../src/regions";
import { sha256Hex, utf8Surrogatepass } from "../src/sha256";

const eolArb = fc.constantFrom("\n", "\r\n", "\r");
const prefixArb = fc.constantFrom("", "", "> ", ">", "> > ", "  ");
const codeArb = fc.constantFrom("x = 1\n", "print(x)\n", "for i in range(2):\n    print(i)\n", "\n", "print('ñ🧪')\n", "x = 1\n");
const bodyArb = fc.constantFrom("```\n1\n```\n", "", "a\n\nb\n", "> [!failure] E\n> t\n", "🧪\n", "```\n<!\u200b-- vault-runner:end sum=0 -->\n```\n");
const proseArb = fc.constantFrom("Texto.", "", "# H", "- item", "   spaces   ", "<!-- mine -->", "```js", "```", "~~~");

interface Piece {
	kind: "prose" | "block";
	prose: string;
	code: string;
	prefix: string;
	fence: string;
	region: string | null;
	blank: boolean;
}

const pieceArb: fc.Arbitrary<Piece> = fc.record({
	kind: fc.constantFrom<"prose" | "block">("prose", "block", "block"),
	prose: proseArb,
	code: codeArb,
	prefix: prefixArb,
	fence: fc.constantFrom("```", "~~~", "````"),
	region: fc.option(bodyArb, { nil: null }),
	blank: fc.boolean(),
});

function render(pieces: Piece[], eol: string, bom: boolean, finalNewline: boolean): string {
	const lines: string[] = [];
	for (const p of pieces) {
		if (p.kind === "prose") {
			lines.push(p.prose);
			continue;
		}
		lines.push(p.prefix + p.fence + "python");
		for (const line of p.code.split("\n").slice(0, -1)) lines.push(line ? p.prefix + line : p.prefix.trimEnd());
		lines.push(p.prefix + p.fence);
		if (p.region !== null) {
			if (p.blank) lines.push(p.prefix.trimEnd());
			for (const line of regionLines({ prefix: p.prefix, eol: "" }, "abcdef012345", p.region)) lines.push(line);
		}
		if (p.prefix.includes(">")) lines.push("");
	}
	const text = lines.map((l) => l + eol).join("");
	return (bom ? "\ufeff" : "") + (finalNewline ? text : text.replace(/[\r\n]+$/, ""));
}

const noteArb = fc
	.tuple(fc.array(pieceArb, { maxLength: 8 }), eolArb, fc.boolean(), fc.boolean())
	.map(([pieces, eol, bom, finalNewline]) => render(pieces, eol, bom, finalNewline));

/** Updates for the blocks of `text`: some ran (new region), some did not, some are eval: false. */
function updatesArb(text: string): fc.Arbitrary<RegionUpdate[]> {
	const blocks = parseNote(text).blocks;
	return fc.tuple(
		...blocks.map((b) =>
			fc.record({
				index: fc.constant(b.index),
				code: fc.constant(b.code),
				code_hash: fc.option(fc.constantFrom("111111111111", "222222222222"), { nil: null, freq: 6 }),
				region: fc.option(bodyArb, { nil: null, freq: 4 }),
			}),
		),
	);
}

const caseArb = noteArb.chain((text) => updatesArb(text).map((updates) => ({ text, updates })));

function withoutRegions(text: string): string {
	const note = parseNote(text);
	const lines = [...note.lines];
	// our regions: those under blocks and the orphans (which the write-back removes when intact)
	const regions = [...note.blocks.flatMap((b) => (b.region ? [b.region] : [])), ...note.orphans].sort((a, b) => b.start - a.start);
	for (const region of regions) lines.splice(region.start, region.stop - region.start);
	return note.bom + lines.map((l) => l.replace(/\r\n|\r|\n/, "\n")).join("").replace(/\n+$/, "");
}

describe("planRegionChanges: properties", () => {
	it("never changes anything outside output regions (contract 1)", () => {
		fc.assert(
			fc.property(caseArb, ({ text, updates }) => {
				const plan = planRegionChanges(text, updates);
				if (plan.problem) return expect(plan.changes).toEqual([]);
				const out = applyChanges(text, plan.changes);
				expect(withoutRegions(out)).toBe(withoutRegions(text));
				expect(parseNote(out).blocks.map((b) => b.code)).toEqual(parseNote(text).blocks.map((b) => b.code));
				// the line endings of the note's own lines are kept
				const endings = (s: string): string[] => splitLines(s).map((l) => l.slice(l.replace(/[\r\n]+$/, "").length));
				if (!/\r(?!\n)/.test(text) && !text.includes("\r\n")) expect(endings(out).every((e) => e === "\n" || e === "")).toBe(true);
			}),
			{ numRuns: 300 },
		);
	});

	it("writes exactly the regions asked for, with valid checksums, and is idempotent", () => {
		fc.assert(
			fc.property(caseArb, ({ text, updates }) => {
				const plan = planRegionChanges(text, updates);
				if (plan.problem) return;
				const out = applyChanges(text, plan.changes);
				const after = parseNote(out);
				for (const update of updates) {
					const block = after.blocks[update.index];
					expect(block).toBeDefined();
					if (!block) continue;
					if (update.code_hash === null) {
						expect(block.region).toBeNull();
					} else if (update.region !== null && plan.applied.includes(update.index)) {
						expect(block.region?.codeHash).toBe(update.code_hash);
						expect(block.region?.handEdited).toBe(false);
						const body = update.region.split("\n").filter((l, i, all) => !(i === all.length - 1 && l === ""));
						expect(block.region?.body).toBe(body.map((l) => l + "\n").join(""));
					}
				}
				expect(planRegionChanges(out, updates).changes).toEqual([]);
			}),
			{ numRuns: 300 },
		);
	});

	it("returns sorted, disjoint, minimal changes inside the text", () => {
		fc.assert(
			fc.property(caseArb, ({ text, updates }) => {
				const { changes } = planRegionChanges(text, updates);
				let at = 0;
				for (const change of changes) {
					expect(change.from).toBeGreaterThanOrEqual(at);
					expect(change.to).toBeGreaterThanOrEqual(change.from);
					expect(change.to).toBeLessThanOrEqual(text.length);
					at = change.to;
					const old = text.slice(change.from, change.to);
					expect(old === "" && change.insert === "").toBe(false);
					// trimmed: old and new do not start (or end) with the same character
					if (old && change.insert) {
						const sameHead = old.charCodeAt(0) === change.insert.charCodeAt(0) && !(old.charCodeAt(1) >= 0xdc00 && old.charCodeAt(1) <= 0xdfff);
						expect(sameHead).toBe(false);
					}
				}
			}),
			{ numRuns: 300 },
		);
	});

	it("leaves blocks whose code is not among the updates alone, and reports them unwritten", () => {
		fc.assert(
			fc.property(caseArb, fc.nat(), ({ text, updates }, pick) => {
				if (updates.length === 0) return;
				const i = pick % updates.length;
				const changed = updates.map((u, j) => (j === i ? { ...u, code: u.code + "# changed\n" } : u));
				const plan = planRegionChanges(text, changed);
				if (plan.problem) return;
				const target = changed[i];
				if (target && target.region !== null && target.code_hash !== null) expect(plan.unwritten).toContain(target.index);
				expect(plan.applied).not.toContain(i);
			}),
			{ numRuns: 200 },
		);
	});

	it("leaves a region edited by hand alone unless forced", () => {
		const text = "```python\nx = 1\n```\n" + regionLines({ prefix: "", eol: "\n" }, "abcdef012345", "old\n").join("").replace("old", "mine");
		const updates: RegionUpdate[] = [{ index: 0, code: "x = 1\n", code_hash: "111111111111", region: "new\n" }];
		const plan = planRegionChanges(text, updates);
		expect(plan.handEdited).toEqual([0]);
		expect(plan.changes).toEqual([]);
		const forced = planRegionChanges(text, updates, { force: true });
		expect(applyChanges(text, forced.changes)).toContain("\nnew\n");
	});

	it("matches repeated code occurrence by occurrence", () => {
		const text = "```python\nx = 1\n```\n\ntext\n\n```python\nx = 1\n```\n";
		const updates: RegionUpdate[] = [
			{ index: 0, code: "x = 1\n", code_hash: "111111111111", region: "first\n" },
			{ index: 1, code: "x = 1\n", code_hash: "222222222222", region: "second\n" },
		];
		const out = applyChanges(text, planRegionChanges(text, updates).changes);
		expect(out.indexOf("first")).toBeLessThan(out.indexOf("second"));
		expect(out).toContain("code=111111111111 -->\nfirst\n");
	});

	it("keeps a missing final newline and a BOM", () => {
		const text = "\ufeff```python\nx = 1\n```";
		const updates: RegionUpdate[] = [{ index: 0, code: "x = 1\n", code_hash: "111111111111", region: "1\n" }];
		const out = applyChanges(text, planRegionChanges(text, updates).changes);
		expect(out.startsWith("\ufeff```python\nx = 1\n```\n<!-- vault-runner:output code=111111111111 -->\n1\n")).toBe(true);
		expect(out.endsWith("-->")).toBe(true);
		const removed = applyChanges(out, planRegionChanges(out, [{ ...updates[0]!, code_hash: null }]).changes);
		expect(removed).toBe(text);
	});

	it("removes an orphaned region exactly as we wrote it, keeps an edited one (as write_back does)", () => {
		const region = regionLines({ prefix: "", eol: "\n" }, "abcdef012345", "1\n").join("");
		const text = "Texto\n\n" + region + "\n```python\nx = 1\n```\n";
		const updates: RegionUpdate[] = [{ index: 0, code: "x = 1\n", code_hash: null, region: null }];
		expect(parseNote(text).orphans.length).toBe(1);
		expect(applyChanges(text, planRegionChanges(text, updates).changes)).toBe("Texto\n\n\n```python\nx = 1\n```\n");
		const edited = text.replace("\n1\n", "\nmine\n");
		expect(planRegionChanges(edited, updates).changes).toEqual([]);
	});

	it("treats markers around typed python code as the user's text", () => {
		const text = "<!-- vault-runner:output code=abc -->\n```python\nx = 1\n```\n<!-- vault-runner:end sum=000000000000 -->\n";
		const note = parseNote(text);
		expect(note.blocks.length).toBe(1);
		expect(note.orphans.length).toBe(0);
		expect(note.strayMarkers).toEqual([0, 4]);
	});

	it("writes under blocks in callouts and lists with their prefix", () => {
		const text = "> [!note]\n> ```python\n> x = 1\n> ```\n";
		const out = applyChanges(text, planRegionChanges(text, [{ index: 0, code: "x = 1\n", code_hash: "111111111111", region: "a\n\nb\n" }]).changes);
		expect(out).toBe(
			`> [!note]\n> \`\`\`python\n> x = 1\n> \`\`\`\n> <!-- vault-runner:output code=111111111111 -->\n> a\n>\n> b\n> <!-- vault-runner:end sum=${regionChecksum("a\n\nb\n")} -->\n`,
		);
	});
});

describe("helpers", () => {
	it("sha256 agrees with node's crypto on any string, lone surrogates encoded as Python's surrogatepass", () => {
		fc.assert(
			fc.property(fc.string({ unit: "binary", maxLength: 200 }), fc.string({ unit: fc.integer({ min: 0xd800, max: 0xdfff }).map((c) => String.fromCharCode(c)), maxLength: 3 }), (s, lone) => {
				const text = s + lone;
				expect(sha256Hex(text)).toBe(createHash("sha256").update(utf8Surrogatepass(text)).digest("hex"));
				if (!lone) expect(Buffer.from(utf8Surrogatepass(s)).equals(Buffer.from(s, "utf8"))).toBe(true);
			}),
			{ numRuns: 300 },
		);
		expect(sha256Hex("")).toBe("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
		expect(Array.from(utf8Surrogatepass("\ud800"))).toEqual([0xed, 0xa0, 0x80]);
	});

	it("trimChange never splits a surrogate pair", () => {
		const text = "a\ud83e\uddeab";
		const change = trimChange(text, { from: 0, to: text.length, insert: "a\ud83e\uddebb" });
		expect(change).toEqual({ from: 1, to: 3, insert: "\ud83e\uddeb" });
	});

	it("knows the runnable languages and finds the block at a line", () => {
		expect(isRunnable("python")).toBe(true);
		expect(isRunnable("{python} title")).toBe(true);
		expect(isRunnable("Py3")).toBe(false);
		expect(isRunnable("ipython3 x=1")).toBe(true);
		expect(isRunnable("js")).toBe(false);
		const text = "intro\n```python\nx = 1\n```\n<!-- vault-runner:output code=abc -->\n1\n<!-- vault-runner:end sum=def -->\nend\n";
		expect(blockAtLine(text, 0)).toBeNull();
		expect(blockAtLine(text, 2)?.index).toBe(0);
		expect(blockAtLine(text, 5)?.index).toBe(0);
		expect(blockAtLine(text, 7)).toBeNull();
	});
});
