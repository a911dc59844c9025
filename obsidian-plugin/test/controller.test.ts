/**
 * The controller: server events into a real CodeMirror EditorState (regions as one
 * transaction, live output while a block runs), Vault.process for notes not open, and the
 * acknowledgement to the server (PROTOCOL.md).
 */
import { history, undo } from "@codemirror/commands";
import { EditorSelection, EditorState, type Transaction, type TransactionSpec } from "@codemirror/state";
import { describe, expect, it } from "vitest";
import type { ApiClient } from "../src/client";
import { Controller, type Host, outputText } from "../src/controller";
import { liveOutputField } from "../src/editor";
import type { RegionsAppliedRequest, ServerEvent } from "../src/protocol";

class Holder {
	constructor(public state: EditorState) {}
	dispatch(spec: TransactionSpec): void {
		this.state = this.state.update(spec).state;
	}
}

const NOTE = "# Nota\n\n```python\nprint('hola')\n```\n\nFin.\n";

function setup(open: boolean) {
	const view = new Holder(EditorState.create({ doc: NOTE, selection: EditorSelection.cursor(NOTE.indexOf("Fin.")), extensions: [history(), liveOutputField] }));
	const files = new Map<string, string>([["A.md", NOTE]]);
	const notices: string[] = [];
	const statuses: string[] = [];
	const sent: RegionsAppliedRequest[] = [];
	const host: Host = {
		editorFor: (note) => (open && note === "A.md" ? view : null),
		processFile: async (note, fn) => {
			const text = files.get(note);
			if (text === undefined) return false;
			files.set(note, fn(text));
			return true;
		},
		notify: (m) => notices.push(m),
		setStatus: (t) => statuses.push(t),
	};
	const client = { regionsApplied: async (r: RegionsAppliedRequest) => (sent.push(r), { note: r.note, run: r.run, accepted: true }) } as unknown as ApiClient;
	const controller = new Controller(host, "c1", () => client);
	return { view, files, notices, statuses, sent, controller };
}

const ev = (kind: string, data: Record<string, unknown> = {}, index: number | null = null): ServerEvent => ({ kind, note: "A.md", index, line: 3, data });

const REGIONS = ev("regions", { run: "r1", updates: [{ index: 0, code: "print('hola')\n", code_hash: "abcabcabcabc", region: "```\nhola\n```\n" }] });

describe("Controller", () => {
	it("shows live output under the running block without touching the document, then writes the region once", async () => {
		const { view, controller, statuses, sent } = setup(true);
		await controller.handle({ kind: "ready", note: null, data: {} });
		await controller.handle(ev("note-started"));
		await controller.handle(ev("block-started", {}, 0));
		await controller.handle(ev("output", { type: "stream", name: "stdout", text: "ho" }, 0));
		await controller.handle(ev("output", { type: "stream", name: "stdout", text: "la\n" }, 0));
		expect(view.state.doc.toString()).toBe(NOTE);
		const live = view.state.field(liveOutputField);
		expect(live.outputs.get(0)?.text).toBe("ho\nla\n");
		expect(live.decorations.size).toBe(1);
		expect(statuses[statuses.length - 1]).toBe("vault-runner: ▶ A line 3");
		// typing while it runs
		view.dispatch({ changes: { from: NOTE.indexOf("Fin."), insert: "Ya " }, userEvent: "input.type" });
		await controller.handle(REGIONS);
		await controller.handle(ev("note-finished", { failed: false, written: false }));
		const text = view.state.doc.toString();
		expect(text).toBe("# Nota\n\n```python\nprint('hola')\n```\n<!-- vault-runner:output code=abcabcabcabc -->\n```\nhola\n```\n<!-- vault-runner:end sum=" + text.split("sum=")[1]);
		expect(text).toContain("\n\nYa Fin.\n");
		expect(view.state.field(liveOutputField).outputs.size).toBe(0);
		expect(sent).toEqual([{ client: "c1", note: "A.md", run: "r1", via: "editor", applied: [0], unwritten: [], hand_edited: [], problem: null }]);
		expect(statuses[statuses.length - 1]).toBe("vault-runner: ready");
		undo({ state: view.state, dispatch: (tr: Transaction) => (view.state = tr.state) });
		expect(view.state.doc.toString()).toBe(NOTE.replace("Fin.", "Ya Fin."));
	});

	it("writes a note that is not open through Vault.process", async () => {
		const { files, controller, sent } = setup(false);
		await controller.handle(REGIONS);
		expect(files.get("A.md")).toContain("<!-- vault-runner:output code=abcabcabcabc -->");
		expect(sent[0]?.via).toBe("file");
	});

	it("reports a block whose code changed as unwritten, and a broken note as a problem", async () => {
		const { view, controller, sent, notices } = setup(true);
		view.dispatch({ changes: { from: NOTE.indexOf("hola"), insert: "¡" } });
		await controller.handle(REGIONS);
		expect(sent[0]?.unwritten).toEqual([0]);
		view.dispatch({ changes: { from: view.state.doc.length, insert: "```python\nx\n" } });
		await controller.handle(REGIONS);
		expect(sent[1]?.problem).toContain("never closed");
		expect(notices[0]).toContain("Outputs not written");
	});

	it("ignores a malformed regions event and clears outputs as one step", async () => {
		const { view, controller, sent } = setup(true);
		expect(await controller.applyRegions("A.md", ev("regions", { run: 1 }))).toBeNull();
		expect(sent).toEqual([]);
		await controller.handle(REGIONS);
		controller.clearOutputs(view);
		expect(view.state.doc.toString()).toBe(NOTE);
		expect(outputText({ type: "error", ename: "ValueError", evalue: "no" })).toBe("ValueError: no\n");
		expect(outputText({ type: "display_data", mime: ["image/png"] })).toBe("[image/png]\n");
	});
});
