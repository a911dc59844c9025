/**
 * The vault-runner Obsidian plugin: thin glue between the app and the pieces that are tested
 * on their own (client.ts, controller.ts, editor.ts, regions.ts).
 */

import { type ChildProcess, spawn } from "child_process";
import { promises as fs } from "fs";
import { homedir } from "os";
import { EditorView, ViewPlugin } from "@codemirror/view";
import { editorInfoField, FileSystemAdapter, MarkdownView, Notice, Plugin, TFile, type MarkdownPostProcessorContext } from "obsidian";
import { runButtonExtension } from "./buttons";
import { ApiClient, type Connection, discover, EventStream, type HostEnv, noteTakerMessage, VaultRunnerError } from "./client";
import { Controller, type Host } from "./controller";
import { liveOutputExtension } from "./editor";
import { PROTOCOL_VERSION } from "./protocol";
import { DEFAULT_SETTINGS, VaultRunnerSettingTab, type VaultRunnerSettings } from "./settings";

function randomId(): string {
	const bytes = new Uint8Array(12);
	crypto.getRandomValues(bytes);
	return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export default class VaultRunnerPlugin extends Plugin {
	settings: VaultRunnerSettings = { ...DEFAULT_SETTINGS };
	private client: ApiClient | null = null;
	private stream: EventStream | null = null;
	private controller!: Controller;
	private statusEl: HTMLElement | null = null;
	private readonly views = new Set<EditorView>();
	private readonly clientId = randomId();
	private lastOpen = "";
	private editorsTimer: number | null = null;
	private serverProcess: ChildProcess | null = null;
	private lastProblem: string | null = null;
	private serverVersion: string | undefined;

	async onload(): Promise<void> {
		await this.loadSettings();
		this.controller = new Controller(this.host(), this.clientId, () => this.client);
		this.statusEl = this.addStatusBarItem();
		this.statusEl.addClass("vault-runner-status");
		this.controller.renderStatus();
		this.addSettingTab(new VaultRunnerSettingTab(this.app, this));
		this.registerCommands();
		this.registerEditorExtension([this.viewTracker(), liveOutputExtension(), runButtonExtension((view, line) => this.runFromView(view, line))]);
		this.registerMarkdownPostProcessor((el, ctx) => this.addReadingButtons(el, ctx));
		this.registerEvent(this.app.workspace.on("layout-change", () => this.scheduleEditors()));
		this.registerEvent(this.app.workspace.on("file-open", () => this.scheduleEditors()));
		this.registerEvent(this.app.vault.on("rename", () => this.scheduleEditors()));
		this.app.workspace.onLayoutReady(() => void this.connect());
	}

	onunload(): void {
		this.stream?.close();
		if (this.client) void this.client.editors({ client: this.clientId, open: [] }).catch(() => undefined);
		if (this.editorsTimer !== null) window.clearTimeout(this.editorsTimer);
		if (this.serverProcess && this.settings.stopWithObsidian) this.serverProcess.kill("SIGTERM");
	}

	async loadSettings(): Promise<void> {
		const saved = (await this.loadData()) as Partial<VaultRunnerSettings> | null;
		this.settings = { ...DEFAULT_SETTINGS, ...(saved ?? {}) };
	}

	async saveSettings(): Promise<void> {
		await this.saveData(this.settings);
	}

	// -- the server -------------------------------------------------------------------------------

	vaultPath(): string | null {
		const adapter = this.app.vault.adapter;
		return adapter instanceof FileSystemAdapter ? adapter.getBasePath() : null;
	}

	private hostEnv(): HostEnv {
		return {
			env: process.env,
			platform: process.platform,
			homedir: homedir(),
			readFile: (path) => fs.readFile(path, "utf8"),
			realpath: (path) => fs.realpath(path),
			pidAlive: (pid) => {
				try {
					process.kill(pid, 0);
					return true;
				} catch (error) {
					return (error as { code?: string }).code === "EPERM";
				}
			},
		};
	}

	private async findServer(): Promise<Connection> {
		const vault = this.vaultPath();
		if (!vault) throw new VaultRunnerError("server_missing", "this vault is not on the local disk");
		const connection = await discover(this.hostEnv(), vault);
		this.serverVersion = connection.server.version;
		this.client = new ApiClient(connection);
		return connection;
	}

	private async connect(): Promise<void> {
		let startedHere = false;
		try {
			await this.findServer();
		} catch (error) {
			if (error instanceof VaultRunnerError && error.code === "server_missing" && this.settings.autoStart) {
				this.startServer();
				startedHere = true;
			} else this.report(error, true);
		}
		this.stream = new EventStream({
			connect: () => this.findServer(),
			client: this.clientId,
			onEvent: (event) => {
				if (event.kind === "ready") {
					this.lastProblem = null;
					this.lastOpen = "";
					this.scheduleEditors(0);
					void this.checkTrust();
				}
				void this.controller.handle(event);
			},
			onState: (state, error) => {
				if (state === "waiting" && error) {
					this.controller.connected = false;
					this.controller.problem = noteTakerMessage(error, this.messageContext());
					this.controller.renderStatus();
					// one notice per kind of trouble, not one per retry
					if (!startedHere && this.lastProblem !== error.code && error.code !== "network") this.report(error, true);
					this.lastProblem = error.code;
				}
			},
		});
		this.stream.start();
	}

	private async checkTrust(): Promise<void> {
		try {
			const status = await this.client?.status();
			if (status && !status.trusted) this.report(new VaultRunnerError("vault_not_trusted", "untrusted"), true);
		} catch (error) {
			this.report(error, true);
		}
	}

	startServer(): void {
		const vault = this.vaultPath();
		if (!vault || this.serverProcess) return;
		const args = ["serve", vault, "--port", String(this.settings.port)];
		try {
			const child = spawn(this.settings.executable, args, { stdio: ["ignore", "ignore", "pipe"], windowsHide: true });
			let stderr = "";
			child.stderr?.on("data", (chunk: Buffer) => (stderr = (stderr + chunk.toString("utf8")).slice(-2000)));
			child.on("error", (error) => {
				this.serverProcess = null;
				new Notice(`vault-runner could not be started (${error.message}). Set the executable's full path in the plugin's settings.`);
			});
			child.on("exit", (code) => {
				this.serverProcess = null;
				if (code) new Notice(`vault-runner serve stopped (exit ${code}): ${stderr.trim().split("\n").pop() ?? ""}`);
			});
			this.serverProcess = child;
			new Notice("Starting vault-runner…");
			window.setTimeout(() => this.stream?.retryNow(), 1500);
		} catch (error) {
			new Notice(`vault-runner could not be started: ${String(error)}`);
		}
	}

	stopServer(): void {
		if (this.serverProcess) this.serverProcess.kill("SIGTERM");
		else new Notice("This plugin did not start the running vault-runner; stop it where you started it (Ctrl+C).");
	}

	private messageContext(): { vaultPath?: string; pluginVersion: string; serverVersion?: string } {
		return { vaultPath: this.vaultPath() ?? undefined, pluginVersion: `${this.manifest.version} (API ${PROTOCOL_VERSION})`, serverVersion: this.serverVersion };
	}

	private report(error: unknown, long = false): void {
		const message =
			error instanceof VaultRunnerError ? noteTakerMessage(error, this.messageContext()) : `vault-runner: ${String(error)}`;
		new Notice(message, long ? 12000 : 6000);
	}

	// -- editors ------------------------------------------------------------------------------------

	private viewTracker(): ViewPlugin<{ destroy(): void }> {
		const views = this.views;
		const changed = (): void => this.scheduleEditors();
		return ViewPlugin.define((view) => {
			views.add(view);
			changed();
			return {
				destroy: () => {
					views.delete(view);
					changed();
				},
			};
		});
	}

	private pathOf(view: EditorView): string | null {
		return view.state.field(editorInfoField, false)?.file?.path ?? null;
	}

	private openNotes(): string[] {
		const open = new Set<string>();
		for (const view of this.views) {
			const path = this.pathOf(view);
			if (path && path.toLowerCase().endsWith(".md")) open.add(path);
		}
		return [...open].sort();
	}

	private scheduleEditors(delay = 300): void {
		if (this.editorsTimer !== null) window.clearTimeout(this.editorsTimer);
		this.editorsTimer = window.setTimeout(() => {
			this.editorsTimer = null;
			void this.sendEditors();
		}, delay);
	}

	private async sendEditors(): Promise<void> {
		const open = this.openNotes();
		const key = open.join("\n");
		if (!this.client || !this.controller.connected || key === this.lastOpen) return;
		try {
			await this.client.editors({ client: this.clientId, open });
			this.lastOpen = key;
		} catch (error) {
			// a server without the endpoint yet writes the files itself, as `watch` does
			if (!(error instanceof VaultRunnerError && error.code === "not_found")) console.warn("vault-runner: editors", error);
			this.lastOpen = key;
		}
	}

	private host(): Host {
		return {
			editorFor: (note) => {
				for (const view of this.views) if (this.pathOf(view) === note) return view;
				return null;
			},
			processFile: async (note, fn) => {
				const file = this.app.vault.getAbstractFileByPath(note);
				if (!(file instanceof TFile)) return false;
				await this.app.vault.process(file, fn);
				return true;
			},
			notify: (message) => new Notice(message, 8000),
			setStatus: (text, tooltip) => {
				if (!this.statusEl) return;
				this.statusEl.setText(text);
				this.statusEl.setAttribute("aria-label", tooltip);
			},
		};
	}

	// -- commands -----------------------------------------------------------------------------------

	private registerCommands(): void {
		// No default hotkeys: the note-taker picks them in Settings → Hotkeys.
		this.addCommand({ id: "run-note", name: "Run note", checkCallback: (checking) => this.withNote(checking, (c, note) => c.run(note)) });
		this.addCommand({
			id: "run-block",
			name: "Run block at cursor",
			editorCheckCallback: (checking, editor, ctx) => {
				const file = ctx.file;
				if (!file || file.extension !== "md") return false;
				if (!checking) void this.call(file, (c, note) => c.runBlock(note, { line: editor.getCursor().line + 1 }));
				return true;
			},
		});
		this.addCommand({
			id: "run-all",
			name: "Restart kernel and run all from the top",
			checkCallback: (checking) => this.withNote(checking, (c, note) => c.runAll(note)),
		});
		this.addCommand({
			id: "interrupt",
			name: "Stop the running block",
			checkCallback: (checking) =>
				this.withNote(checking, async (c, note) => {
					const result = await c.interrupt(note);
					if (!result.interrupted) new Notice("Nothing is running in this note.");
					return result;
				}),
		});
		this.addCommand({
			id: "restart-kernel",
			name: "Restart kernel",
			checkCallback: (checking) =>
				this.withNote(checking, async (c, note) => {
					const result = await c.restart(note);
					new Notice("The kernel was shut down; the next run starts fresh.");
					return result;
				}),
		});
		this.addCommand({
			id: "clear-outputs",
			name: "Clear outputs of the note",
			checkCallback: (checking) => {
				const file = this.app.workspace.getActiveFile();
				if (!file || file.extension !== "md") return false;
				if (!checking) void this.clearOutputs(file);
				return true;
			},
		});
		this.addCommand({ id: "start-server", name: "Start vault-runner serve for this vault", callback: () => this.startServer() });
		this.addCommand({ id: "stop-server", name: "Stop the vault-runner this plugin started", callback: () => this.stopServer() });
	}

	private withNote(checking: boolean, action: (client: ApiClient, note: string) => Promise<unknown>): boolean {
		const file = this.app.workspace.getActiveFile();
		if (!file || file.extension !== "md") return false;
		if (!checking) void this.call(file, action);
		return true;
	}

	/** Save the note first (the server reads the file), then call the API; errors as notices. */
	private async call(file: TFile, action: (client: ApiClient, note: string) => Promise<unknown>): Promise<void> {
		try {
			for (const leaf of this.app.workspace.getLeavesOfType("markdown")) {
				const view = leaf.view;
				if (view instanceof MarkdownView && view.file?.path === file.path) await view.save();
			}
			if (!this.client) await this.findServer();
			if (!this.client) return;
			const result = await action(this.client, file.path);
			if (result && typeof result === "object" && "error" in result) {
				const error = (result as { error?: { code: string; message: string } | null }).error;
				if (error) this.report(new VaultRunnerError(error.code, error.message, 200, error.message));
			}
		} catch (error) {
			this.report(error, error instanceof VaultRunnerError && ["server_missing", "vault_not_trusted", "version_mismatch"].includes(error.code));
		}
	}

	private runFromView(view: EditorView, line: number): void {
		const path = this.pathOf(view);
		const file = path ? this.app.vault.getAbstractFileByPath(path) : null;
		if (file instanceof TFile) void this.call(file, (c, note) => c.runBlock(note, { line }));
	}

	private async clearOutputs(file: TFile): Promise<void> {
		for (const view of this.views) {
			if (this.pathOf(view) === file.path) {
				this.controller.clearOutputs(view);
				return;
			}
		}
		const text = await this.app.vault.read(file);
		await Controller.clearFile(this.app.vault, file, text);
	}

	// -- reading view -------------------------------------------------------------------------------

	private addReadingButtons(el: HTMLElement, ctx: MarkdownPostProcessorContext): void {
		const codes = el.querySelectorAll("pre > code");
		codes.forEach((code) => {
			const language = Array.from(code.classList).find((c) => c.startsWith("language-"))?.slice(9).toLowerCase();
			if (!language || !["python", "py", "python3", "ipython", "ipython3"].includes(language)) return;
			const pre = code.parentElement;
			if (!pre || pre.querySelector(".vault-runner-run-button")) return;
			const button = pre.createEl("button", { cls: "vault-runner-run-button", text: "▶ Run" });
			button.setAttribute("aria-label", "Run this block with vault-runner");
			button.addEventListener("click", (event) => {
				event.preventDefault();
				const info = ctx.getSectionInfo(el);
				const file = this.app.vault.getAbstractFileByPath(ctx.sourcePath);
				if (!info || !(file instanceof TFile)) {
					new Notice("Open the note in the editor to run this block.");
					return;
				}
				void this.call(file, (c, note) => c.runBlock(note, { line: info.lineStart + 1 }));
			});
		});
	}
}
