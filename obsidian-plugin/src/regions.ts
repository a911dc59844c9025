/**
 * Output regions, the same way vault_runner/note.py and engine.py see them.
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

// Python's str.strip()/rstrip() with no argument strip what str.isspace() calls space,
// which is not JavaScript's \s (\x1c-\x1f and \x85 are; \ufeff is not).
const PY_WS = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const PY_LSTRIP_RE = new RegExp(`^[${PY_WS}]+`);
const PY_RSTRIP_RE = new RegExp(`[${PY_WS}]+$`);
const PY_SPLIT_RE = new RegExp(`[${PY_WS}]+`);

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
		if (line === "---" || line === "...") return i + 1;
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

function findRegion(lines: string[], closeIndex: number, prefix: string): { region: Region | null; problem: NoteProblem | null } {
	let i = closeIndex + 1;
	while (i < lines.length && !pyStrip(stripPrefix(lines[i] ?? "", prefix))) i++;
	if (i >= lines.length) return { region: null, problem: null };
	const opening = OPEN_RE.exec(pyStrip(stripPrefix(lines[i] ?? "", prefix)));
	if (!opening) return { region: null, problem: null };
	const body: string[] = [];
	for (let j = i + 1; j < lines.length; j++) {
		const content = stripPrefix(lines[j] ?? "", prefix);
		const end = END_RE.exec(pyStrip(content));
		if (end) {
			const text = body.map((line) => line + "\n").join("");
			const recordedSum = end[1] ?? "";
			return {
				region: {
					start: i,
					stop: j + 1,
					codeHash: opening[1] ?? "",
					recordedSum,
					body: text,
					handEdited: regionChecksum(text) !== recordedSum,
				},
				problem: null,
			};
		}
		if (OPEN_RE.test(pyStrip(content))) break;
		body.push(content);
	}
	return {
		region: null,
		problem: {
			message:
				"has an output region with no end marker; delete its `<!-- vault-runner:output` line (or restore the end marker) and run again",
			line: i + 1,
		},
	};
}

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
	// Blank the frontmatter rather than cut it, so line maps stay note lines.
	const source = "\n".repeat(span) + lines.slice(span).map((line) => stripEnding(line) + "\n").join("");
	const tokens = parser().parse(source, {});
	const blocks: Block[] = [];
	const problems: NoteProblem[] = [];
	let regionUntil = -1;
	for (const token of tokens) {
		if (token.type !== "fence" || !token.map || !isRunnable(token.info)) continue;
		const [openIndex, stopIndex] = token.map;
		if (openIndex < regionUntil) continue; // a fence inside one of our output regions
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
		const { region, problem } = findRegion(lines, closeIndex, prefix);
		if (problem) problems.push(problem);
		if (region) regionUntil = region.stop;
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
	return { text, bom, lines, blocks, problems };
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

/**
 * note.py `splice`, as changes against the original text instead of a new string: each
 * block's region lines (or the point after its closing fence) are replaced, then the common
 * head and tail of old and new are trimmed away, so that unchanged text (and a cursor in it)
 * is not touched. Changes are sorted and do not overlap.
 */
export function spliceChanges(note: ParsedNote, regions: RegionMap): TextChange[] {
	const { lines, bom } = note;
	const starts: number[] = [bom.length];
	for (const line of lines) starts.push((starts[starts.length - 1] ?? 0) + line.length);
	const offset = (line: number): number => starts[line] ?? 0;
	const changes: TextChange[] = [];
	for (const block of note.blocks) {
		if (!regions.has(block.index)) continue;
		const wanted = regions.get(block.index);
		let start: number;
		let stop: number;
		if (block.region) {
			start = block.region.start;
			stop = block.region.stop;
		} else {
			start = stop = block.closeLine; // 0-based index just after the closing fence
		}
		if (wanted === null || wanted === undefined) {
			if (!block.region) continue;
			const atEnd = stop === lines.length && !lineEnding(lines[stop - 1] ?? "");
			let from = offset(start);
			if (atEnd && start > 0) from -= lineEnding(lines[start - 1] ?? "").length;
			changes.push({ from, to: offset(stop), insert: "" });
			continue;
		}
		const fresh = [...wanted];
		let prefixText = "";
		if (stop === lines.length) {
			const last = fresh.length - 1;
			if (!block.region) {
				// The closing fence is the last line: give it an ending, and keep the note's
				// missing final newline by leaving it off our last line instead.
				const fence = lines[start - 1] ?? "";
				if (!lineEnding(fence)) {
					prefixText = block.eol;
					fresh[last] = stripEnding(fresh[last] ?? "");
				}
			} else if (!lineEnding(lines[stop - 1] ?? "")) {
				fresh[last] = stripEnding(fresh[last] ?? "");
			}
		}
		const insert = prefixText + fresh.join("");
		changes.push(trimChange(note.text, { from: offset(start), to: offset(stop), insert }));
	}
	changes.sort((a, b) => a.from - b.from);
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
 * engine.py `_regions_for` + `splice`: match the blocks of the note as it is now to the
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
	return { changes: spliceChanges(note, regions), applied, unwritten, handEdited, problem: null };
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
