/**
 * The editor adapter against a real CodeMirror 6 EditorState (the editor Obsidian uses),
 * with the real history extension: typing during a run is kept, the cursor stays where it
 * was, one undo step takes the whole write back, nothing outside regions changes.
 */
import { history, undo, undoDepth } from "@codemirror/commands";
import { EditorSelection, EditorState, type Transaction, type TransactionSpec } from "@codemirror/state";
import { describe, expect, it } from "vitest";
import { applyToEditor, applyToFile, regionTransaction, vaultRunnerWrite, WRITE_USER_EVENT } from "../src/editor";
import type { RegionUpdate } from "../src/protocol";
import { parseNote, regionChecksum } from "../src/regions";

/** A minimal view over a real EditorState: dispatch applies the transaction. */
class StateHolder {
	transactions: Transaction[] = [];
	constructor(public state: EditorState) {}
	dispatch(spec: TransactionSpec): void {
		const tr = this.state.update(spec);
		this.transactions.push(tr);
		this.state = tr.state;
	}
	type(at: number, text: string): void {
		this.dispatch({
			changes: { from: at, insert: text },
			selection: EditorSelection.cursor(at + text.length),
			userEvent: "input.type",
		});
	}
	undo(): boolean {
		return undo({ state: this.state, dispatch: (tr: Transaction) => this.dispatch(tr) });
	}
}

const NOTE = [
	"---",
	"vault-runner: true",
	"---",
	"# Tensores",
	"",
	"```python",
	"x = 1",
	"print(x)",
	"```",
	"",
	"Texto entre bloques.",
	"",
	"```python",
	"print('dos')",
	"```",
	"<!-- vault-runner:output code=aaaaaaaaaaaa -->",
	"```",
	"viejo",
	"```",
	`<!-- vault-runner:end sum=${regionChecksum("```\nviejo\n```\n")} -->`,
	"Fin.",
	"",
].join("\n");

const UPDATES: RegionUpdate[] = [
	{ index: 0, code: "x = 1\nprint(x)\n", code_hash: "111111111111", region: "```\n1\n```\n" },
	{ index: 1, code: "print('dos')\n", code_hash: "222222222222", region: "```\ndos\n```\n" },
];

function holder(doc: string, cursor: number): StateHolder {
	return new StateHolder(EditorState.create({ doc, selection: EditorSelection.cursor(cursor), extensions: [history()] }));
}

describe("applyToEditor on a real EditorState", () => {
	it("keeps text typed while the run was in flight, and the cursor in it", () => {
		const prose = NOTE.indexOf("Texto entre bloques.");
		const view = holder(NOTE, prose);
		// The run starts; the note-taker types in the prose between the blocks.
		view.type(prose, "Escribo mientras corre. ");
		const cursor = view.state.selection.main.head;
		const typedState = view.state.doc.toString();
		const plan = applyToEditor(view, UPDATES, "run-1");
		const after = view.state.doc.toString();
		expect(after).toContain("Escribo mientras corre. Texto entre bloques.");
		expect(after).toContain("<!-- vault-runner:output code=111111111111 -->\n```\n1\n```\n");
		expect(after).toContain("<!-- vault-runner:output code=222222222222 -->\n```\ndos\n```\n");
		expect(after).not.toContain("viejo");
		expect(plan.applied).toEqual([0, 1]);
		// The cursor is still right after the typed text (it moved with the inserted region above it).
		const typedAt = after.indexOf("Escribo mientras corre. ") + "Escribo mientras corre. ".length;
		expect(view.state.selection.main.head).toBe(typedAt);
		expect(typedAt - cursor).toBe(after.indexOf("Escribo") - typedState.indexOf("Escribo"));
		// Everything outside the regions is unchanged: strip the regions and compare.
		const strip = (text: string): string => {
			const note = parseNote(text);
			const lines = [...note.lines];
			for (const block of [...note.blocks].reverse()) if (block.region) lines.splice(block.region.start, block.region.stop - block.region.start);
			return lines.join("");
		};
		expect(strip(after)).toBe(strip(typedState));
	});

	it("is one transaction and one undo step that reverts the whole update, not the typing", () => {
		const view = holder(NOTE, 0);
		view.type(NOTE.indexOf("Fin."), "¡");
		const typed = view.state.doc.toString();
		const depth = undoDepth(view.state);
		const before = view.transactions.length;
		applyToEditor(view, UPDATES, "run-2");
		expect(view.transactions.length - before).toBe(1);
		const tr = view.transactions[view.transactions.length - 1];
		expect(tr?.annotation(vaultRunnerWrite)).toBe("run-2");
		expect(tr?.isUserEvent(WRITE_USER_EVENT)).toBe(true);
		expect(undoDepth(view.state)).toBe(depth + 1);
		expect(view.undo()).toBe(true);
		expect(view.state.doc.toString()).toBe(typed);
		expect(view.undo()).toBe(true); // the next undo takes the typing back
		expect(view.state.doc.toString()).toBe(NOTE);
	});

	it("typing right after the write is not merged into its undo step", () => {
		const view = holder(NOTE, 0);
		applyToEditor(view, UPDATES, "run-3");
		const written = view.state.doc.toString();
		const end = written.indexOf("<!-- vault-runner:end sum=", written.indexOf("code=111111111111"));
		view.type(end, "x"); // adjacent to the region, immediately
		expect(view.undo()).toBe(true);
		expect(view.state.doc.toString()).toBe(written);
	});

	it("leaves a block whose code was edited during the run alone (contract 5)", () => {
		const at = NOTE.indexOf("print(x)") + "print(x)".length;
		const view = holder(NOTE, at);
		view.type(at, " # editado");
		const typed = view.state.doc.toString();
		const plan = applyToEditor(view, UPDATES, "run-4");
		expect(plan.unwritten).toEqual([0]);
		expect(plan.applied).toEqual([1]);
		const after = view.state.doc.toString();
		expect(after).not.toContain("code=111111111111");
		expect(after).toContain("print(x) # editado\n```\n\nTexto");
		expect(view.state.selection.main.head).toBe(typed.indexOf(" # editado") + " # editado".length);
	});

	it("keeps a selection that spans a region's neighbourhood mapped", () => {
		const from = NOTE.indexOf("Texto");
		const to = NOTE.indexOf("Fin.") + 4;
		const view = new StateHolder(EditorState.create({ doc: NOTE, selection: EditorSelection.range(from, to), extensions: [history()] }));
		applyToEditor(view, UPDATES, "run-5");
		const after = view.state.doc.toString();
		const range = view.state.selection.main;
		expect(after.slice(range.from, range.to).startsWith("Texto")).toBe(true);
		expect(after.slice(range.from, range.to).endsWith("Fin.")).toBe(true);
	});

	it("does nothing (no transaction) when the regions are already what ran", () => {
		const view = holder(NOTE, 3);
		applyToEditor(view, UPDATES, "run-6");
		const count = view.transactions.length;
		const { spec, plan } = regionTransaction(view.state, UPDATES, "run-7");
		expect(spec).toBeNull();
		expect(plan.applied).toEqual([0, 1]);
		applyToEditor(view, UPDATES, "run-7");
		expect(view.transactions.length).toBe(count);
	});

	it("writes nothing into a note with an unclosed fence", () => {
		const broken = NOTE + "```python\nnunca cerrado\n";
		const view = holder(broken, 0);
		const plan = applyToEditor(view, UPDATES, "run-8");
		expect(plan.problem?.message).toContain("never closed");
		expect(view.state.doc.toString()).toBe(broken);
	});
});

describe("applyToFile (Vault.process for notes not open)", () => {
	it("splices what process reads and returns the plan", async () => {
		let disk = NOTE.replace(/\n/g, "\r\n");
		const vault = {
			process: async (_file: string, fn: (data: string) => string): Promise<string> => {
				disk = fn(disk);
				return disk;
			},
		};
		const plan = await applyToFile(vault, "Nota.md", UPDATES);
		expect(plan.applied).toEqual([0, 1]);
		expect(disk).toContain("```\r\n<!-- vault-runner:output code=111111111111 -->\r\n```\r\n1\r\n```\r\n<!-- vault-runner:end sum=");
		expect(disk.replace(/\r\n/g, "")).not.toContain("\n");
	});
});
