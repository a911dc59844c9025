/**
 * The plugin's client and controller against a REAL `vault-runner serve` (started by
 * tests/frontends/test_obsidian_plugin.py, which sets VAULT_RUNNER_LIVE_VAULT and the config
 * dir): discovery through the real server file and token file, real HTTP with the headers the
 * plugin sends (Bearer token, Host 127.0.0.1:PORT, Origin app://obsidian.md), the real event
 * stream, and a real CodeMirror EditorState as the open editor.
 *
 * The scripted session: the note is registered as open, "run block at cursor" is sent, text is
 * typed into the editor while the block runs; the regions arrive on the stream and go into the
 * editor as one transaction. The typed text and the new output are both there, the server never
 * wrote the file, and the one write is the editor's save. Skipped when no server was started.
 */
import { history, undo } from "@codemirror/commands";
import { EditorSelection, EditorState, type Transaction, type TransactionSpec } from "@codemirror/state";
import { promises as fs } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ApiClient, discover, EventStream, type HostEnv } from "../src/client";
import { Controller, type Host } from "../src/controller";
import { liveOutputField } from "../src/editor";
import type { ServerEvent } from "../src/protocol";

const VAULT = process.env.VAULT_RUNNER_LIVE_VAULT;
const NOTE = "Live/sesion.md";
const ORIGIN = { Origin: "app://obsidian.md" };
const TYPED = "Escrito mientras corre. ";

const host: HostEnv = {
	env: process.env,
	platform: process.platform,
	homedir: homedir(),
	readFile: (path) => fs.readFile(path, "utf8"),
	realpath: (path) => fs.realpath(path),
	pidAlive: (pid) => {
		try {
			process.kill(pid, 0);
			return true;
		} catch {
			return false;
		}
	},
};

class Editor {
	transactions: Transaction[] = [];
	constructor(public state: EditorState) {}
	dispatch(spec: TransactionSpec): void {
		const tr = this.state.update(spec);
		this.transactions.push(tr);
		this.state = tr.state;
	}
}

function waitFor(what: string, predicate: () => boolean, ms = 120000): Promise<void> {
	return new Promise((resolve, reject) => {
		const started = Date.now();
		const tick = (): void => {
			if (predicate()) resolve();
			else if (Date.now() - started > ms) reject(new Error(`gave up waiting: ${what}`));
			else setTimeout(tick, 20);
		};
		tick();
	});
}

describe.skipIf(!VAULT)("the plugin against a real vault-runner serve", () => {
	it("runs the block at the cursor while the note-taker types: both kept, the server never writes the open note", async () => {
		const vault = VAULT as string;
		const file = join(vault, NOTE);
		const original = await fs.readFile(file, "utf8");
		const statBefore = await fs.stat(file);
		const connection = await discover(host, vault);
		const client = new ApiClient(connection, { extraHeaders: ORIGIN });
		const status = await client.status();
		expect(status.trusted).toBe(true);

		const cursor = original.indexOf("time.sleep");
		const editor = new Editor(EditorState.create({ doc: original, selection: EditorSelection.cursor(cursor), extensions: [history(), liveOutputField] }));
		const events: ServerEvent[] = [];
		const notices: string[] = [];
		const appHost: Host = {
			editorFor: (note) => (note === NOTE ? editor : null),
			processFile: () => Promise.resolve(false),
			notify: (message) => notices.push(message),
			setStatus: () => undefined,
		};
		const clientId = "live0123456789abcdef0123";
		const controller = new Controller(appHost, clientId, () => client);
		let handled = Promise.resolve();
		const stream = new EventStream({
			connect: () => discover(host, vault),
			client: clientId,
			extraHeaders: ORIGIN,
			onEvent: (event) => {
				events.push(event);
				handled = handled.then(() => controller.handle(event));
				if (event.kind === "ready") void client.editors({ client: clientId, open: [NOTE] });
			},
		});
		stream.start();
		try {
			await waitFor("the stream to open", () => stream.state === "open");
			await waitFor("the editors set to be registered", () => events.some((e) => e.kind === "ready"));
			const registered = await client.editors({ client: clientId, open: [NOTE, "../fuera.md"] });
			expect(registered.open).toEqual([NOTE]);
			expect(registered.ignored).toEqual([{ note: "../fuera.md", code: "invalid_path" }]);

			// Run block at cursor: the line of the cursor, as the command sends it.
			const line = editor.state.doc.lineAt(cursor).number;
			const queued = await client.runBlock(NOTE, { line });
			expect(queued.state).toBe("queued");
			await waitFor("the block to start", () => events.some((e) => e.kind === "block-started" && e.note === NOTE));
			// The note-taker types in the prose below the block while it runs.
			const prose = editor.state.doc.toString().indexOf("Texto de abajo.");
			editor.dispatch({ changes: { from: prose, insert: TYPED }, selection: EditorSelection.cursor(prose + TYPED.length), userEvent: "input.type" });
			await waitFor("the live output", () => events.some((e) => e.kind === "output" && e.note === NOTE));
			await waitFor("the run to finish", () => events.some((e) => e.kind === "note-finished" && e.note === NOTE));
			await handled;

			const regions = events.filter((e) => e.kind === "regions");
			expect(regions).toHaveLength(1);
			const finished = events.find((e) => e.kind === "note-finished");
			expect(finished?.data.delegated).toBe(true);
			expect(finished?.data.written).toBe(false);
			expect(events.some((e) => e.kind === "note-written")).toBe(false);

			const text = editor.state.doc.toString();
			expect(text).toContain(TYPED + "Texto de abajo.");
			expect(text).toMatch(/<!-- vault-runner:output code=[0-9a-f]{12} -->\n```\nlisto 42\n```\n<!-- vault-runner:end sum=[0-9a-f]{12} -->/);
			// The cursor stayed in the typed text; one undo step takes the output back, not the typing.
			expect(editor.state.selection.main.head).toBe(text.indexOf(TYPED) + TYPED.length);
			expect(controller.acks).toEqual([{ client: clientId, note: NOTE, run: regions[0]?.data.run, via: "editor", applied: [0], unwritten: [], hand_edited: [], problem: null }]);
			expect(notices).toEqual([]);

			// The server did not touch the open note.
			expect(await fs.readFile(file, "utf8")).toBe(original);
			expect((await fs.stat(file)).mtimeMs).toBe(statBefore.mtimeMs);

			// Obsidian saves the buffer: the one write. The watcher sees it, runs nothing, writes nothing.
			await fs.writeFile(file, text, "utf8");
			const saved = await fs.stat(file);
			const results = await client.results(NOTE);
			expect(results.report.blocks?.[0]?.status).toBe("ok");
			await new Promise((resolve) => setTimeout(resolve, 1500));
			expect(await fs.readFile(file, "utf8")).toBe(text);
			expect((await fs.stat(file)).mtimeMs).toBe(saved.mtimeMs);
			expect(events.filter((e) => e.kind === "note-written")).toHaveLength(0);

			undo({ state: editor.state, dispatch: (tr: Transaction) => editor.dispatch(tr) });
			expect(editor.state.doc.toString()).toBe(original.replace("Texto de abajo.", TYPED + "Texto de abajo."));
		} finally {
			await client.editors({ client: clientId, open: [] }).catch(() => undefined);
			stream.close();
		}
	});
});
