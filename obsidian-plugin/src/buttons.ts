/**
 * The Run button on python blocks in the editor (live preview and source mode): a widget at
 * the end of each runnable opening fence line. A CodeMirror ViewPlugin, so it follows edits.
 */

import { RangeSetBuilder, type Extension } from "@codemirror/state";
import { Decoration, type DecorationSet, type EditorView, ViewPlugin, type ViewUpdate, WidgetType } from "@codemirror/view";
import { parseNote } from "./regions";

/** Called with the 1-based line of the block's opening fence. */
export type RunAtLine = (view: EditorView, line: number) => void;

class RunButton extends WidgetType {
	constructor(
		readonly line: number,
		private readonly run: RunAtLine,
	) {
		super();
	}

	eq(other: RunButton): boolean {
		return other.line === this.line;
	}

	toDOM(view: EditorView): HTMLElement {
		const button = document.createElement("button");
		button.className = "vault-runner-run-button";
		button.textContent = "▶ Run";
		button.setAttribute("aria-label", "Run this block with vault-runner");
		button.addEventListener("mousedown", (event) => event.preventDefault());
		button.addEventListener("click", (event) => {
			event.preventDefault();
			event.stopPropagation();
			this.run(view, this.line);
		});
		return button;
	}

	ignoreEvent(): boolean {
		return true;
	}
}

export function runButtonDecorations(view: EditorView, run: RunAtLine): DecorationSet {
	const doc = view.state.doc;
	const text = doc.toString();
	if (!/```|~~~/.test(text)) return Decoration.none;
	const builder = new RangeSetBuilder<Decoration>();
	for (const block of parseNote(text).blocks) {
		if (block.fenceLine > doc.lines) continue;
		const at = doc.line(block.fenceLine).to;
		builder.add(at, at, Decoration.widget({ widget: new RunButton(block.fenceLine, run), side: 1 }));
	}
	return builder.finish();
}

export function runButtonExtension(run: RunAtLine): Extension {
	return ViewPlugin.fromClass(
		class {
			decorations: DecorationSet;
			constructor(view: EditorView) {
				this.decorations = runButtonDecorations(view, run);
			}
			update(update: ViewUpdate): void {
				if (update.docChanged) this.decorations = runButtonDecorations(update.view, run);
			}
		},
		{ decorations: (plugin) => plugin.decorations },
	);
}
