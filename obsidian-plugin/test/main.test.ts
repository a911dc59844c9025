/**
 * The thin Obsidian glue, against the stand-in `obsidian` module (the app cannot run here):
 * commands exist with no default hotkeys, the status bar item exists, editor extensions and
 * the reading-view post-processor are registered, settings load with defaults.
 */
import { describe, expect, it } from "vitest";
import { App, type Command, notices, type Plugin, TFile } from "./stubs/obsidian";
import VaultRunnerPlugin from "../src/main";
import { DEFAULT_SETTINGS, parsePort } from "../src/settings";

type Stubbed = VaultRunnerPlugin & Plugin;

describe("the plugin glue", () => {
	it("registers its commands without hotkeys, a status bar item and its editor extensions", async () => {
		const app = new App();
		const plugin = new VaultRunnerPlugin(app as never, { id: "vault-runner", version: "0.1.0" } as never) as Stubbed;
		await plugin.onload();
		const ids = (plugin.commands as Command[]).map((c) => c.id);
		expect(ids).toEqual(["run-note", "run-block", "run-all", "interrupt", "restart-kernel", "clear-outputs", "start-server", "stop-server"]);
		expect((plugin.commands as Command[]).every((c) => c.hotkeys === undefined)).toBe(true);
		expect(plugin.statusBar[0]?.text).toBe("vault-runner: off");
		expect(plugin.extensions.length).toBe(1);
		expect(plugin.postProcessors.length).toBe(1);
		expect(plugin.settings).toEqual(DEFAULT_SETTINGS);
		// no note open: the note commands are not offered
		const runNote = (plugin.commands as Command[]).find((c) => c.id === "run-note");
		expect(runNote?.checkCallback?.(true)).toBe(false);
		plugin.onunload();
	});

	it("clears the outputs of a note that is not open through Vault.process", async () => {
		const app = new App();
		const note = "```python\nx = 1\n```\n<!-- vault-runner:output code=abc -->\n1\n<!-- vault-runner:end sum=def -->\n";
		app.files.set("N.md", note);
		app.activeFile = new TFile("N.md");
		const plugin = new VaultRunnerPlugin(app as never, { id: "vault-runner", version: "0.1.0" } as never) as Stubbed;
		await plugin.onload();
		const clear = (plugin.commands as Command[]).find((c) => c.id === "clear-outputs");
		expect(clear?.checkCallback?.(false)).toBe(true);
		await new Promise((resolve) => setTimeout(resolve, 10));
		expect(app.files.get("N.md")).toBe("```python\nx = 1\n```\n");
		plugin.onunload();
	});

	it("explains a missing server to the note-taker when a command runs", async () => {
		const app = new App();
		app.activeFile = new TFile("N.md");
		const plugin = new VaultRunnerPlugin(app as never, { id: "vault-runner", version: "0.1.0" } as never) as Stubbed;
		await plugin.onload();
		process.env.VAULT_RUNNER_CONFIG_DIR = "/nonexistent-vault-runner-config";
		const before = notices.length;
		(plugin.commands as Command[]).find((c) => c.id === "run-note")?.checkCallback?.(false);
		await new Promise((resolve) => setTimeout(resolve, 50));
		expect(notices.slice(before).join("\n")).toContain("vault-runner is not running for this vault");
		plugin.onunload();
		expect(parsePort("8080")).toBe(8080);
		expect(parsePort("70000")).toBeNull();
	});
});
