// @vitest-environment happy-dom
/**
 * A real @codemirror/view EditorView (in happy-dom): the Run button on python fences, the
 * live output widget, and a region write dispatched through the view with its undo.
 */
import { history, undo } from "@codemirror/commands";
import { EditorState } from "@codemirror/state";
import { EditorView } from "@codemirror/view";
import { afterEach, describe, expect, it } from "vitest";
import { runButtonExtension } from "../src/buttons";
import { applyToEditor, liveOutputField, setLiveOutput } from "../src/editor";

const NOTE = "Intro\n\n```python\nprint(1)\n```\n\n```js\nx\n```\n\n~~~py\nprint(2)\n~~~\n";
const views: EditorView[] = [];
afterEach(() => views.splice(0).forEach((v) => v.destroy()));

function mount(runs: number[]): EditorView {
	const parent = document.createElement("div");
	document.body.appendChild(parent);
	const view = new EditorView({
		state: EditorState.create({ doc: NOTE, extensions: [history(), liveOutputField, runButtonExtension((_v, line) => runs.push(line))] }),
		parent,
	});
	views.push(view);
	return view;
}

describe("EditorView integration", () => {
	it("puts a Run button on each python fence, which runs that block's line", () => {
		const runs: number[] = [];
		const view = mount(runs);
		const buttons = view.dom.querySelectorAll<HTMLButtonElement>(".vault-runner-run-button");
		expect(buttons.length).toBe(2);
		buttons[1]?.dispatchEvent(new MouseEvent("click", { bubbles: true }));
		expect(runs).toEqual([11]);
	});

	it("shows live output and applies a region in one undoable step through the view", () => {
		const view = mount([]);
		view.dispatch({ effects: setLiveOutput.of({ index: 0, text: "1\n", state: "running" }) });
		expect(view.dom.querySelector(".vault-runner-live-output pre")?.textContent).toBe("1\n");
		applyToEditor(view, [{ index: 0, code: "print(1)\n", code_hash: "abcdefabcdef", region: "```\n1\n```\n" }], "r");
		expect(view.state.doc.toString()).toContain("```\n<!-- vault-runner:output code=abcdefabcdef -->\n```\n1\n```\n");
		undo(view);
		expect(view.state.doc.toString()).toBe(NOTE);
	});
});
