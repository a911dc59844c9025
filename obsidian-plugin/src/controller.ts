/**
 * What the plugin does with the server's events, without Obsidian: the `regions` event goes
 * into the open editor (one transaction) or, for a note not open, through Vault.process; the
 * `output` events become live output under the running block; the status line follows the
 * runs. main.ts wires this to the app; tests drive it with real CodeMirror states.
 */

import type { ApiClient } from "./client";
import { applyToEditor, applyToFile, clearLiveOutput, setLiveOutput, type Dispatcher } from "./editor";
import type { Output, RegionsAppliedRequest, RegionsEventData, RegionUpdate, ServerEvent } from "./protocol";
import type { RegionPlan } from "./regions";
import { parseNote, spliceText } from "./regions";

/** The app as the controller needs it. */
export interface Host {
	/** the editor showing this note, if one is open */
	editorFor(note: string): Dispatcher | null;
	/** Vault.process on the note's file; null when there is no such file */
	processFile(note: string, fn: (data: string) => string): Promise<boolean>;
	notify(message: string): void;
	setStatus(text: string, tooltip: string): void;
}

export interface RunningBlock {
	index: number | null;
	line: number | null;
	started: number;
}

const LIVE_LIMIT = 20000;

export function outputText(output: Output): string {
	if (output.type === "error") return `${output.ename ?? "Error"}: ${output.evalue ?? ""}\n`;
	if (typeof output.text === "string") return output.text.endsWith("\n") ? output.text : output.text + "\n";
	if (output.mime && output.mime.length) return `[${output.mime.join(", ")}]\n`;
	return "";
}

function isRegionUpdate(value: unknown): value is RegionUpdate {
	if (typeof value !== "object" || value === null) return false;
	const v = value as Record<string, unknown>;
	return (
		typeof v.index === "number" &&
		typeof v.code === "string" &&
		(v.code_hash === null || typeof v.code_hash === "string") &&
		(v.region === null || typeof v.region === "string")
	);
}

export function regionsData(event: ServerEvent): RegionsEventData | null {
	const data = event.data;
	if (typeof data.run !== "string" || !Array.isArray(data.updates) || !data.updates.every(isRegionUpdate)) return null;
	return { run: data.run, updates: data.updates, force: data.force === true };
}

export class Controller {
	connected = false;
	problem: string | null = null;
	readonly running = new Map<string, RunningBlock>();
	private readonly live = new Map<string, Map<number, string>>();
	/** acknowledgements sent, for tests and logs */
	readonly acks: RegionsAppliedRequest[] = [];

	constructor(
		private readonly host: Host,
		readonly clientId: string,
		private readonly client: () => ApiClient | null,
	) {}

	async handle(event: ServerEvent): Promise<void> {
		const note = event.note;
		switch (event.kind) {
			case "ready":
				this.connected = true;
				this.problem = null;
				break;
			case "closing":
				this.connected = false;
				this.problem = "vault-runner is shutting down";
				this.running.clear();
				break;
			case "note-started":
				if (note) this.running.set(note, { index: null, line: null, started: Date.now() });
				break;
			case "block-started":
				if (note) {
					this.running.set(note, { index: event.index ?? null, line: event.line ?? null, started: Date.now() });
					if (typeof event.index === "number") this.showLive(note, event.index, "", "running");
				}
				break;
			case "output":
				if (note && typeof event.index === "number") {
					const previous = this.live.get(note)?.get(event.index) ?? "";
					const text = (previous + outputText(event.data as Output)).slice(-LIVE_LIMIT);
					this.showLive(note, event.index, text, "running");
				}
				break;
			case "regions":
				if (note) await this.applyRegions(note, event);
				break;
			case "note-finished":
				if (note) {
					this.running.delete(note);
					this.clearLive(note);
					const data = event.data;
					const report = data.report as { message?: unknown } | undefined;
					if (data.failed === true && report && typeof report.message === "string") this.host.notify(report.message);
				}
				break;
			default:
				break;
		}
		this.renderStatus();
	}

	private showLive(note: string, index: number, text: string, state: "running"): void {
		let byIndex = this.live.get(note);
		if (!byIndex) this.live.set(note, (byIndex = new Map<number, string>()));
		byIndex.set(index, text);
		this.host.editorFor(note)?.dispatch({ effects: setLiveOutput.of({ index, text, state }) });
	}

	private clearLive(note: string): void {
		if (!this.live.delete(note)) return;
		this.host.editorFor(note)?.dispatch({ effects: clearLiveOutput.of({ index: null }) });
	}

	/** Contract 11: write the regions where the note is, and tell the server what happened. */
	async applyRegions(note: string, event: ServerEvent): Promise<RegionPlan | null> {
		const data = regionsData(event);
		if (!data) return null;
		const view = this.host.editorFor(note);
		let plan: RegionPlan | null = null;
		let via: RegionsAppliedRequest["via"] = "none";
		if (view) {
			plan = applyToEditor(view, data.updates, data.run, { force: data.force });
			via = "editor";
		} else {
			let result: RegionPlan | null = null;
			const found = await this.host.processFile(note, (text) => {
				const spliced = spliceText(text, data.updates, { force: data.force });
				result = spliced.plan;
				return spliced.text;
			});
			if (found && result) {
				plan = result;
				via = "file";
			}
		}
		const ack: RegionsAppliedRequest = {
			client: this.clientId,
			note,
			run: data.run,
			via,
			applied: plan?.applied ?? [],
			unwritten: plan?.unwritten ?? [],
			hand_edited: plan?.handEdited ?? [],
			problem: plan?.problem ? `line ${plan.problem.line}: the note ${plan.problem.message}` : plan ? null : "the note is not in the vault",
		};
		this.acks.push(ack);
		if (plan?.problem) this.host.notify(`Outputs not written: ${note}:${plan.problem.line}: the note ${plan.problem.message}`);
		const client = this.client();
		if (client) {
			try {
				await client.regionsApplied(ack);
			} catch {
				// an older server without the endpoint, or a drop: the regions are written anyway
			}
		}
		return plan;
	}

	/** Clear the outputs of a note: every region removed, as one undo step. */
	clearOutputs(view: Dispatcher): RegionPlan {
		const note = parseNote(view.state.doc.toString());
		const updates: RegionUpdate[] = note.blocks.map((b) => ({ index: b.index, code: b.code, code_hash: null, region: null }));
		return applyToEditor(view, updates, "clear", { force: true });
	}

	static async clearFile<F>(vault: { process(file: F, fn: (data: string) => string): Promise<string> }, file: F, text: string): Promise<RegionPlan> {
		const note = parseNote(text);
		const updates: RegionUpdate[] = note.blocks.map((b) => ({ index: b.index, code: b.code, code_hash: null, region: null }));
		return applyToFile(vault, file, updates, { force: true });
	}

	statusText(): { text: string; tooltip: string } {
		if (!this.connected) return { text: "vault-runner: off", tooltip: this.problem ?? "vault-runner serve is not connected" };
		if (this.running.size === 0) return { text: "vault-runner: ready", tooltip: "Connected to vault-runner serve" };
		const [note, block] = [...this.running.entries()][0] ?? ["", { index: null, line: null, started: 0 }];
		const name = note.split("/").pop()?.replace(/\.md$/i, "") ?? note;
		const where = block.line ? ` line ${block.line}` : "";
		const more = this.running.size > 1 ? ` +${this.running.size - 1}` : "";
		return { text: `vault-runner: ▶ ${name}${where}${more}`, tooltip: [...this.running.keys()].join("\n") };
	}

	renderStatus(): void {
		const { text, tooltip } = this.statusText();
		this.host.setStatus(text, tooltip);
	}
}
