/**
 * A stand-in for the `obsidian` module (vitest alias): just enough of the app for the thin UI
 * glue in main.ts and settings.ts. Everything with logic is tested without it.
 */
import { StateField } from "@codemirror/state";

export const notices: string[] = [];

export class Notice {
	constructor(message: string, _timeout?: number) {
		notices.push(message);
	}
}

export class TFile {
	extension: string;
	constructor(public path: string) {
		this.extension = path.split(".").pop() ?? "";
	}
}

export class FileSystemAdapter {
	constructor(private readonly base: string) {}
	getBasePath(): string {
		return this.base;
	}
}

export class MarkdownView {
	file: TFile | null = null;
	saved = 0;
	async save(): Promise<void> {
		this.saved++;
	}
}

export interface MarkdownPostProcessorContext {
	sourcePath: string;
	getSectionInfo(el: HTMLElement): { lineStart: number; lineEnd: number; text: string } | null;
}

export const editorInfoField = StateField.define<{ file: TFile | null }>({
	create: () => ({ file: null }),
	update: (value) => value,
});

type Listener = (...args: unknown[]) => unknown;

export interface Command {
	id: string;
	name: string;
	hotkeys?: unknown[];
	callback?: () => unknown;
	checkCallback?: (checking: boolean) => boolean | void;
	editorCheckCallback?: (checking: boolean, editor: unknown, ctx: unknown) => boolean | void;
}

export class App {
	listeners = new Map<string, Listener[]>();
	activeFile: TFile | null = null;
	leaves: { view: unknown }[] = [];
	files = new Map<string, string>();
	workspace = {
		on: (name: string, fn: Listener) => {
			this.listeners.set(name, [...(this.listeners.get(name) ?? []), fn]);
			return { name };
		},
		onLayoutReady: (fn: () => void) => this.listeners.set("layout-ready", [fn]),
		getActiveFile: () => this.activeFile,
		getLeavesOfType: (_type: string) => this.leaves,
	};
	vault = {
		adapter: new FileSystemAdapter("/vault"),
		on: (name: string, fn: Listener) => this.workspace.on(name, fn),
		getAbstractFileByPath: (path: string) => (this.files.has(path) ? new TFile(path) : null),
		read: async (file: TFile) => this.files.get(file.path) ?? "",
		process: async (file: TFile, fn: (data: string) => string) => {
			const out = fn(this.files.get(file.path) ?? "");
			this.files.set(file.path, out);
			return out;
		},
	};
}

export class Plugin {
	commands: Command[] = [];
	extensions: unknown[] = [];
	postProcessors: unknown[] = [];
	statusBar: FakeElement[] = [];
	data: unknown = null;
	settingTabs: unknown[] = [];
	constructor(
		public app: App,
		public manifest: { id: string; version: string },
	) {}
	addCommand(command: Command): Command {
		this.commands.push(command);
		return command;
	}
	addStatusBarItem(): FakeElement {
		const el = new FakeElement();
		this.statusBar.push(el);
		return el;
	}
	addSettingTab(tab: unknown): void {
		this.settingTabs.push(tab);
	}
	registerEditorExtension(extension: unknown): void {
		this.extensions.push(extension);
	}
	registerMarkdownPostProcessor(fn: unknown): void {
		this.postProcessors.push(fn);
	}
	registerEvent(_ref: unknown): void {}
	async loadData(): Promise<unknown> {
		return this.data;
	}
	async saveData(data: unknown): Promise<void> {
		this.data = data;
	}
}

export class FakeElement {
	text = "";
	attributes = new Map<string, string>();
	classes = new Set<string>();
	setText(text: string): void {
		this.text = text;
	}
	setAttribute(name: string, value: string): void {
		this.attributes.set(name, value);
	}
	addClass(name: string): void {
		this.classes.add(name);
	}
	empty(): void {}
}

export class PluginSettingTab {
	containerEl = new FakeElement();
	constructor(
		public app: App,
		public plugin: Plugin,
	) {}
}

export class Setting {
	constructor(_el: unknown) {}
	setName(): this {
		return this;
	}
	setDesc(): this {
		return this;
	}
	addText(): this {
		return this;
	}
	addToggle(): this {
		return this;
	}
}
