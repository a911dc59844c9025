/**
 * Output regions, the same way vault_runner/core/note.py and engine/writeback.py see them.
 *
 * Pure: text in, values out. Given a note's text and the blocks of a run (their code as it
 * ran, the hash to record, the new region body), `planRegionChanges` finds each block again
 * by its code, occurrence by occurrence, and returns the smallest set of `{from, to, insert}`
 * changes that writes the regions under the blocks whose code is still the code that ran
 * (DESIGN.md contract 5). Nothing outside a region ever changes (contract 1).
 *
 * Offsets are UTF-16 code units of the given text, as CodeMirror and JavaScript count them.
 * A BOM at the start of the text is kept and counted.
 */

import MarkdownIt from "markdown-it";
import type { RegionUpdate } from "./protocol";
import { sha256Hex } from "./sha256";

export const RUNNABLE_LANGUAGES: ReadonlySet<string> = new Set(["python", "py", "python3", "ipython", "ipython3"]);

export const OPEN_MARKER_PREFIX = "<!-- vault-runner:output code=";
const OPEN_RE = /^<!-- vault-runner:output code=([0-9a-f]{1,64})(?: [^>]*)? -->[ \t]*$/;
const END_RE = /^<!-- vault-runner:end sum=([0-9a-f]{1,64}) -->[ \t]*$/;
const LINE_RE = /[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+/g;
// Python's \b after a word: the next character is not a (Unicode) word character.
const PY_WORD_END = "(?![\\p{L}\\p{N}_])";
const MARKER_LINE_RE = new RegExp(`^([ \\t>]*)<!-- vault-runner:(?:output|end)${PY_WORD_END}`, "u");

// Python's str.strip()/rstrip() with no argument strip what str.isspace() calls space,
// which is not JavaScript's \s (\x1c-\x1f and \x85 are; \ufeff is not).
const PY_WS = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const PY_LSTRIP_RE = new RegExp(`^[${PY_WS}]+`);
const PY_RSTRIP_RE = new RegExp(`[${PY_WS}]+$`);
const PY_SPLIT_RE = new RegExp(`[${PY_WS}]+`);
const RUNNABLE_FENCE_RE = new RegExp(
	`^[${PY_WS}]*(?:\`{3,}|~{3,})[${PY_WS}]*\\{?[${PY_WS}]*(?:python3?|py|ipython3?)${PY_WORD_END}`,
	"iu",
);

export function pyRstrip(s: string): string {
	return s.replace(PY_RSTRIP_RE, "");
}

export function pyStrip(s: string): string {
	return s.replace(PY_LSTRIP_RE, "").replace(PY_RSTRIP_RE, "");
}

// Only block structure matters; inline parsing is most of the cost (as in note.py).
let markdown: MarkdownIt | null = null;
function parser(): MarkdownIt {
	if (markdown === null) markdown = new MarkdownIt("commonmark").disable(["inline", "text_join"]);
	return markdown;
}

export interface Region {
	/** 0-based index of the opening marker line */
	start: number;
	/** 0-based index one past the end marker line */
	stop: number;
	codeHash: string;
	recordedSum: string;
	/** the lines between the markers, prefix removed, LF endings */
	body: string;
	handEdited: boolean;
}

export interface Block {
	index: number;
	/** 1-based line of the opening fence */
	fenceLine: number;
	/** 1-based line of the closing fence */
	closeLine: number;
	info: string;
	code: string;
	prefix: string;
	eol: string;
	region: Region | null;
}

export interface NoteProblem {
	message: string;
	line: number;
}

export interface ParsedNote {
	text: string;
	bom: string;
	/** lines of the text after the BOM, endings kept */
	lines: string[];
	blocks: Block[];
	problems: NoteProblem[];
	/** regions of ours that follow no python block: inert text */
	orphans: Region[];
	/** 0-based lines of markers that pair with nothing we wrote */
	strayMarkers: number[];
}

export function splitLines(text: string): string[] {
	return text.match(LINE_RE) ?? [];
}

export function lineEnding(line: string): string {
	if (line.endsWith("\r\n")) return "\r\n";
	if (line.endsWith("\n") || line.endsWith("\r")) return line.slice(-1);
	return "";
}

export function stripEnding(line: string): string {
	return line.slice(0, line.length - lineEnding(line).length);
}

export function regionChecksum(body: string): string {
	return sha256Hex(body).slice(0, 12);
}

export function isRunnable(info: string): boolean {
	const words = pyStrip(info).split(PY_SPLIT_RE);
	const first = words[0];
	if (!first) return false;
	const language = (first.replace(/^[{}]+|[{}]+$/g, "").split(",")[0] ?? "").toLowerCase();
	return RUNNABLE_LANGUAGES.has(language);
}

function frontmatterSpan(lines: string[]): number {
	const first = lines[0];
	if (first === undefined || pyRstrip(stripEnding(first)) !== "---") return 0;
	for (let i = 1; i < lines.length; i++) {
		const line = pyRstrip(stripEnding(lines[i] ?? ""));
		if (line === "---") return i + 1; // Obsidian's reading: only `---` closes the properties
		if (MARKER_LINE_RE.test(lines[i] ?? "")) return 0; // a `---` rule opens the note
	}
	return 0;
}

function fencePrefix(line: string, fenceChar: string): string {
	const body = stripEnding(line);
	const position = body.indexOf(fenceChar.repeat(3));
	return position >= 0 ? body.slice(0, position) : "";
}

function stripPrefix(line: string, prefix: string): string {
	const body = stripEnding(line);
	if (body.startsWith(prefix)) return body.slice(prefix.length);
	const bare = pyRstrip(prefix);
	if (body.startsWith(bare)) return body.slice(bare.length);
	return body.replace(/^[ >\t]+/, "");
}

/**
 * note.py `_scan_regions`: every region of ours, found by its markers alone, and the stray
 * markers. A region is ours when an opening marker pairs with the next end marker (no other
 * opening marker between) under the same prefix; a hand-edited one that now holds a python
 * fence is the user's text (markers that paired by accident).
 */
function scanRegions(lines: string[], start: number): { regions: Region[]; strays: number[] } {
	const regions: Region[] = [];
	const strays: number[] = [];
	let i = start;
	while (i < lines.length) {
		const marker = MARKER_LINE_RE.exec(lines[i] ?? "");
		if (!marker) {
			i++;
			continue;
		}
		const prefix = marker[1] ?? "";
		const opening = OPEN_RE.exec(pyStrip(stripPrefix(lines[i] ?? "", prefix)));
		if (!opening) {
			strays.push(i);
			i++;
			continue;
		}
		const body: string[] = [];
		let endIndex: number | null = null;
		let end: RegExpExecArray | null = null;
		for (let j = i + 1; j < lines.length; j++) {
			const content = stripPrefix(lines[j] ?? "", prefix);
			end = END_RE.exec(pyStrip(content));
			if (end) {
				endIndex = j;
				break;
			}
			if (OPEN_RE.test(pyStrip(content))) break;
			body.push(content);
		}
		if (endIndex === null || end === null) {
			strays.push(i);
			i++;
			continue;
		}
		const text = body.map((line) => line + "\n").join("");
		const recordedSum = end[1] ?? "";
		const region: Region = {
			start: i,
			stop: endIndex + 1,
			codeHash: opening[1] ?? "",
			recordedSum,
			body: text,
			handEdited: regionChecksum(text) !== recordedSum,
		};
		if (region.handEdited && body.some((line) => RUNNABLE_FENCE_RE.test(line))) {
			strays.push(i);
			i++;
			continue;
		}
		regions.push(region);
		i = endIndex + 1;
	}
	return { regions, strays };
}

/** note.py `_region_after`: where a closing fence's region would start (blank lines may sit between). */
function regionAfter(lines: string[], closeIndex: number, prefix: string, starts: ReadonlyMap<number, Region>): number {
	let i = closeIndex + 1;
	while (i < lines.length && !starts.has(i) && !pyStrip(stripPrefix(lines[i] ?? "", prefix))) i++;
	return i;
}

const NO_END_MARKER =
	"has an output region with no end marker; delete its `<!-- vault-runner:output` line (or restore the end marker) and run again";

function firstEnding(lines: string[]): string {
	for (const line of lines) {
		const ending = lineEnding(line);
		if (ending) return ending;
	}
	return "\n";
}

/** note.py `parse_note`, less the frontmatter and option YAML, which splicing never needs. */
export function parseNote(text: string): ParsedNote {
	const bom = text.startsWith("\ufeff") ? "\ufeff" : "";
	const lines = splitLines(text.slice(bom.length));
	const span = frontmatterSpan(lines);
	const { regions, strays } = scanRegions(lines, span);
	const inert = new Set<number>();
	for (const region of regions) for (let line = region.start; line < region.stop; line++) inert.add(line);
	// Blank the frontmatter and our regions rather than cut them, so line maps stay note lines
	// and nothing an output holds can change how the user's own text parses.
	const source = lines.map((line, index) => (index < span || inert.has(index) ? "\n" : stripEnding(line) + "\n")).join("");
	const tokens = parser().parse(source, {});
	const starts = new Map<number, Region>(regions.map((r) => [r.start, r]));
	const strayOpens = new Set(strays.filter((i) => OPEN_RE.test(pyStrip(stripEnding(lines[i] ?? "").replace(/^[ >\t]+/, "")))));
	const blocks: Block[] = [];
	const problems: NoteProblem[] = [];
	const attached = new Set<number>();
	for (const token of tokens) {
		if (token.type !== "fence" || !token.map || !isRunnable(token.info)) continue;
		const [openIndex, stopIndex] = token.map;
		const closeIndex = stopIndex - 1;
		const closed = (token.content.match(/\n/g) ?? []).length === stopIndex - openIndex - 2;
		if (!closed) {
			problems.push({
				message: `has a \`\`\`${pyStrip(token.info)} block that is never closed; add a closing ${token.markup} line after its code`,
				line: openIndex + 1,
			});
			continue;
		}
		const closeLine = lines[closeIndex] ?? "";
		const prefix = fencePrefix(closeLine, token.markup.charAt(0));
		const where = regionAfter(lines, closeIndex, prefix, starts);
		const region = starts.get(where) ?? null;
		if (region) attached.add(region.start);
		else if (strayOpens.has(where)) problems.push({ message: NO_END_MARKER, line: where + 1 });
		blocks.push({
			index: blocks.length,
			fenceLine: openIndex + 1,
			closeLine: closeIndex + 1,
			info: pyStrip(token.info),
			code: token.content,
			prefix,
			eol: lineEnding(closeLine) || firstEnding(lines),
			region,
		});
	}
	const orphans = regions.filter((r) => !attached.has(r.start));
	return { text, bom, lines, blocks, problems, orphans, strayMarkers: strays };
}

/** note.py `removable_orphans`: orphaned regions exactly as we wrote them. */
export function removableOrphans(note: ParsedNote): Region[] {
	return note.orphans.filter((o) => !o.handEdited);
}

/** note.py `region_lines`: the region's lines, prefixed and ended like the block's own. */
export function regionLines(block: Pick<Block, "prefix" | "eol">, codeHash: string, body: string): string[] {
	const { eol, prefix } = block;
	const blankPrefix = pyRstrip(prefix);
	const inner = body.split("\n");
	if (inner.length && inner[inner.length - 1] === "") inner.pop();
	const out = [prefix + `<!-- vault-runner:output code=${codeHash} -->` + eol];
	for (const line of inner) out.push((line ? prefix + line : blankPrefix) + eol);
	const checksum = regionChecksum(inner.map((line) => line + "\n").join(""));
	out.push(prefix + `<!-- vault-runner:end sum=${checksum} -->` + eol);
	return out;
}

export interface TextChange {
	from: number;
	to: number;
	insert: string;
}

/** For each block index: its new region lines, or null to remove its region. */
export type RegionMap = ReadonlyMap<number, string[] | null>;

interface SpliceLine {
	text: string;
	/** the original line index, or null for a line that is new or changed */
	orig: number | null;
}

/**
 * note.py `splice` (regions of blocks replaced or removed, `orphans` removed), run exactly
 * as Python runs it, bottom-up on the lines, each line remembering whether it is an
 * original one; then read back as changes against the original text: every run of new or
 * changed lines replaces the original lines between the kept ones around it. The common
 * head and tail of each change are trimmed, so unchanged text (and a cursor in it) is not
 * touched. Changes are sorted and disjoint.
 */
export function spliceChanges(note: ParsedNote, regions: RegionMap, orphans: readonly Region[] = []): TextChange[] {
	const lines: SpliceLine[] = note.lines.map((text, orig) => ({ text, orig }));
	type Edit = { start: number; stop: number; fresh: string[] | null; block: Block | null };
	const edits: Edit[] = [];
	for (const block of note.blocks) {
		if (!regions.has(block.index)) continue;
		const fresh = regions.get(block.index) ?? null;
		if (block.region) edits.push({ start: block.region.start, stop: block.region.stop, fresh, block });
		else if (fresh !== null) edits.push({ start: block.closeLine, stop: block.closeLine, fresh, block });
	}
	for (const orphan of orphans) edits.push({ start: orphan.start, stop: orphan.stop, fresh: null, block: null });
	edits.sort((a, b) => b.start - a.start); // bottom-up (stable, like Python's sorted)
	const changed = (line: SpliceLine, text: string): SpliceLine => ({ text, orig: text === line.text ? line.orig : null });
	for (const { start, stop, fresh, block } of edits) {
		if (fresh === null) {
			const atEnd = stop === lines.length && !lineEnding(lines[stop - 1]?.text ?? "");
			lines.splice(start, stop - start);
			const before = lines[start - 1];
			if (atEnd && before) lines[start - 1] = changed(before, stripEnding(before.text));
			continue;
		}
		const texts = [...fresh];
		const last = texts.length - 1;
		if (stop === lines.length && block) {
			if (!block.region) {
				// The closing fence is the last line: give it an ending, and keep the note's
				// missing final newline by leaving it off our last line instead.
				const fence = lines[start - 1];
				if (fence && !lineEnding(fence.text)) {
					lines[start - 1] = changed(fence, fence.text + block.eol);
					texts[last] = stripEnding(texts[last] ?? "");
				}
			} else if (!lineEnding(lines[stop - 1]?.text ?? "")) {
				texts[last] = stripEnding(texts[last] ?? "");
			}
		}
		lines.splice(start, stop - start, ...texts.map((text) => ({ text, orig: null })));
	}
	const starts: number[] = [note.bom.length];
	for (const line of note.lines) starts.push((starts[starts.length - 1] ?? 0) + line.length);
	const offset = (line: number): number => starts[line] ?? 0;
	const changes: TextChange[] = [];
	let insert = "";
	let next = 0;
	const flush = (upTo: number): void => {
		if (upTo !== next || insert !== "") changes.push(trimChange(note.text, { from: offset(next), to: offset(upTo), insert }));
		insert = "";
	};
	for (const line of lines) {
		if (line.orig === null) {
			insert += line.text;
			continue;
		}
		flush(line.orig);
		next = line.orig + 1;
	}
	flush(note.lines.length);
	return changes.filter((c) => c.from !== c.to || c.insert !== "");
}

function isHighSurrogate(code: number): boolean {
	return code >= 0xd800 && code <= 0xdbff;
}

/** Drop the head and tail that old and new text share, never splitting a surrogate pair. */
export function trimChange(text: string, change: TextChange): TextChange {
	const old = text.slice(change.from, change.to);
	const insert = change.insert;
	const most = Math.min(old.length, insert.length);
	let head = 0;
	while (head < most && old.charCodeAt(head) === insert.charCodeAt(head)) head++;
	if (head > 0 && isHighSurrogate(old.charCodeAt(head - 1))) head--;
	let tail = 0;
	while (tail < most - head && old.charCodeAt(old.length - 1 - tail) === insert.charCodeAt(insert.length - 1 - tail)) tail++;
	if (tail > 0 && isHighSurrogate(old.charCodeAt(old.length - 1 - tail))) tail--;
	return { from: change.from + head, to: change.to - tail, insert: insert.slice(head, insert.length - tail) };
}

export function applyChanges(text: string, changes: readonly TextChange[]): string {
	let out = "";
	let at = 0;
	for (const change of changes) {
		out += text.slice(at, change.from) + change.insert;
		at = change.to;
	}
	return out + text.slice(at);
}

export interface RegionPlan {
	changes: TextChange[];
	/** RegionUpdate.index of the blocks whose region is written or removed by `changes` */
	applied: number[];
	/** blocks that ran but whose code is no longer in the note: their output waits for the next run */
	unwritten: number[];
	/** blocks whose region was edited by hand and so left alone */
	handEdited: number[];
	/** set when nothing may be written (an unclosed fence, a region without end marker) */
	problem: NoteProblem | null;
}

export interface PlanOptions {
	/** overwrite regions edited by hand (the CLI's --force) */
	force?: boolean;
}

/**
 * writeback.py `_regions_for` + `splice`: match the blocks of the note as it is now to the
 * blocks as they ran, by code, occurrence by occurrence, and plan the changes.
 */
export function planRegionChanges(text: string, updates: readonly RegionUpdate[], options: PlanOptions = {}): RegionPlan {
	const note = parseNote(text);
	const firstProblem = note.problems[0];
	if (firstProblem) return { changes: [], applied: [], unwritten: [], handEdited: [], problem: firstProblem };
	const queues = new Map<string, RegionUpdate[]>();
	for (const update of updates) {
		const queue = queues.get(update.code);
		if (queue) queue.push(update);
		else queues.set(update.code, [update]);
	}
	const regions = new Map<number, string[] | null>();
	const matched = new Set<RegionUpdate>();
	const applied: number[] = [];
	const handEdited: number[] = [];
	for (const block of note.blocks) {
		const update = queues.get(block.code)?.shift();
		if (!update) continue;
		matched.add(update);
		if (update.code_hash === null) {
			if (block.region) {
				regions.set(block.index, null);
				applied.push(update.index);
			}
			continue;
		}
		if (update.region === null) continue;
		if (block.region && block.region.handEdited && !options.force) {
			handEdited.push(update.index);
			continue;
		}
		regions.set(block.index, regionLines(block, update.code_hash, update.region));
		applied.push(update.index);
	}
	const unwritten = updates.filter((u) => u.region !== null && u.code_hash !== null && !matched.has(u)).map((u) => u.index);
	// The engine also removes orphaned regions that are exactly as it wrote them.
	return { changes: spliceChanges(note, regions, removableOrphans(note)), applied, unwritten, handEdited, problem: null };
}

/** The whole new text: what `Vault.process` writes for a note that is not open. */
export function spliceText(text: string, updates: readonly RegionUpdate[], options: PlanOptions = {}): { text: string; plan: RegionPlan } {
	const plan = planRegionChanges(text, updates, options);
	return { text: applyChanges(text, plan.changes), plan };
}

/** The python block that holds a 0-based line (its fences, its code or its region), if any. */
export function blockAtLine(text: string, line: number): Block | null {
	const note = parseNote(text);
	for (const block of note.blocks) {
		const first = block.fenceLine - 1;
		const last = block.region ? block.region.stop - 1 : block.closeLine - 1;
		if (line >= first && line <= last) return block;
	}
	return null;
}
