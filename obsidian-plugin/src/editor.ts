/**
 * Writing regions into an open note through its CodeMirror 6 editor (DESIGN.md contract 11),
 * and into a note that is not open through `Vault.process`.
 *
 * Editor path: the changes are computed from the editor's document as it is at this very
 * moment (with whatever the note-taker typed while the block ran) and dispatched as ONE
 * transaction: one undo step, selection and folds mapped through the changes by CodeMirror,
 * no text outside the regions touched. Obsidian then saves the buffer itself, once.
 *
 * Live output: while a block runs, its `output` events are shown as a widget under the block,
 * not written into the document (no undo entries, no saves, nothing to merge); the real region
 * arrives once, with the `regions` event.
 */

import {
	Annotation,
	EditorState,
	RangeSetBuilder,
	StateEffect,
	StateField,
	Transaction,
	type ChangeSpec,
	type Extension,
	type TransactionSpec,
} from "@codemirror/state";
import { isolateHistory } from "@codemirror/commands";
import { Decoration, type DecorationSet, EditorView, WidgetType } from "@codemirror/view";
import type { RegionUpdate } from "./protocol";
import { parseNote, planRegionChanges, spliceText, type PlanOptions, type RegionPlan } from "./regions";

/** Marks our own transactions (value: the run id), so listeners can tell them from typing. */
export const vaultRunnerWrite = Annotation.define<string>();

/** The user event of our writes (CodeMirror's `userEvent`; never merged with typing in history). */
export const WRITE_USER_EVENT = "vault-runner.output";

export interface RegionTransaction {
	/** null when there is nothing to change */
	spec: TransactionSpec | null;
	plan: RegionPlan;
}

/** The transaction that writes `updates` into `state`'s document; pure (dispatches nothing). */
export function regionTransaction(
	state: EditorState,
	updates: readonly RegionUpdate[],
	run: string,
	options: PlanOptions = {},
): RegionTransaction {
	const plan = planRegionChanges(state.doc.toString(), updates, options);
	if (plan.changes.length === 0) return { spec: null, plan };
	const changes: ChangeSpec[] = plan.changes.map((c) => ({ from: c.from, to: c.to, insert: c.insert }));
	return {
		spec: {
			changes,
			// No `selection`: CodeMirror maps the current one through the changes, so the
			// cursor stays in the text it was in. No scrollIntoView: the view stays put.
			annotations: [
				vaultRunnerWrite.of(run),
				Transaction.userEvent.of(WRITE_USER_EVENT),
				Transaction.addToHistory.of(true),
				// Its own undo step: typing just before or just after it is never merged into it.
				isolateHistory.of("full"),
			],
		},
		plan,
	};
}

/** Something that can take a transaction: an EditorView (or a test's stand-in). */
export interface Dispatcher {
	readonly state: EditorState;
	dispatch(spec: TransactionSpec): void;
}

/** Apply a `regions` event to an open editor, now, in one transaction. */
export function applyToEditor(view: Dispatcher, updates: readonly RegionUpdate[], run: string, options: PlanOptions = {}): RegionPlan {
	const { spec, plan } = regionTransaction(view.state, updates, run, options);
	if (spec) view.dispatch(spec);
	return plan;
}

/** The part of Obsidian's Vault this needs (so it can be tested without the app). */
export interface ProcessingVault<F> {
	process(file: F, fn: (data: string) => string): Promise<string>;
}

/**
 * Apply a `regions` event to a note that is not open: `Vault.process` reads, the splice runs
 * on what it read, and Obsidian writes the result atomically with respect to its own saves.
 */
export async function applyToFile<F>(
	vault: ProcessingVault<F>,
	file: F,
	updates: readonly RegionUpdate[],
	options: PlanOptions = {},
): Promise<RegionPlan> {
	let plan: RegionPlan | null = null;
	await vault.process(file, (data) => {
		const result = spliceText(data, updates, options);
		plan = result.plan;
		return result.text;
	});
	if (plan === null) throw new Error("Vault.process did not call back");
	return plan;
}

// -- live output while a block runs ------------------------------------------------------------

export interface LiveOutput {
	/** block index among the note's python blocks (the event's `index`) */
	index: number;
	/** the text shown so far */
	text: string;
	/** "running" while the block runs; the widget goes when the regions arrive or the run ends */
	state: "queued" | "running";
}

export const setLiveOutput = StateEffect.define<LiveOutput>();
export const clearLiveOutput = StateEffect.define<{ index: number | null }>();

const LIVE_LIMIT = 20000;

class LiveOutputWidget extends WidgetType {
	constructor(
		readonly text: string,
		readonly state: LiveOutput["state"],
	) {
		super();
	}

	eq(other: LiveOutputWidget): boolean {
		return other.text === this.text && other.state === this.state;
	}

	toDOM(): HTMLElement {
		const box = document.createElement("div");
		box.className = "vault-runner-live-output";
		box.setAttribute("aria-live", "polite");
		const label = document.createElement("div");
		label.className = "vault-runner-live-label";
		label.textContent = this.state === "running" ? "Running…" : "Queued";
		box.appendChild(label);
		if (this.text) {
			const pre = document.createElement("pre");
			pre.textContent = this.text.length > LIVE_LIMIT ? "…" + this.text.slice(-LIVE_LIMIT) : this.text;
			box.appendChild(pre);
		}
		return box;
	}

	ignoreEvent(): boolean {
		return true;
	}
}

interface LiveState {
	outputs: Map<number, LiveOutput>;
	decorations: DecorationSet;
}

function buildDecorations(state: EditorState, outputs: Map<number, LiveOutput>): DecorationSet {
	if (outputs.size === 0) return Decoration.none;
	const note = parseNote(state.doc.toString());
	const builder = new RangeSetBuilder<Decoration>();
	for (const block of note.blocks) {
		const live = outputs.get(block.index);
		if (!live) continue;
		// After the closing fence line (CodeMirror's document always has LF lines).
		const lineNumber = Math.min(block.closeLine, state.doc.lines);
		const at = state.doc.line(lineNumber).to;
		builder.add(at, at, Decoration.widget({ widget: new LiveOutputWidget(live.text, live.state), side: 1, block: true }));
	}
	return builder.finish();
}

/** The StateField holding live output widgets; add it to the editor's extensions. */
export const liveOutputField = StateField.define<LiveState>({
	create: () => ({ outputs: new Map(), decorations: Decoration.none }),
	update(value, tr) {
		let outputs = value.outputs;
		let touched = false;
		for (const effect of tr.effects) {
			if (effect.is(setLiveOutput)) {
				outputs = new Map(outputs);
				outputs.set(effect.value.index, effect.value);
				touched = true;
			} else if (effect.is(clearLiveOutput)) {
				outputs = new Map(outputs);
				if (effect.value.index === null) outputs.clear();
				else outputs.delete(effect.value.index);
				touched = true;
			}
		}
		if (touched) return { outputs, decorations: buildDecorations(tr.state, outputs) };
		if (tr.docChanged) return { outputs, decorations: value.decorations.map(tr.changes) };
		return value;
	},
	provide: (field) => EditorView.decorations.from(field, (value) => value.decorations),
});

export function liveOutputExtension(): Extension {
	return [liveOutputField];
}
