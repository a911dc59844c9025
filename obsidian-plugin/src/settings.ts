import { type App, PluginSettingTab, Setting } from "obsidian";

export interface VaultRunnerSettings {
	/** the `vault-runner` executable, e.g. a venv's /home/me/venv/bin/vault-runner */
	executable: string;
	/** start `vault-runner serve` when Obsidian opens this vault and none runs */
	autoStart: boolean;
	/** stop the server the plugin started when Obsidian closes */
	stopWithObsidian: boolean;
	/** the port for a server the plugin starts; 0 picks a free one */
	port: number;
}

export const DEFAULT_SETTINGS: VaultRunnerSettings = {
	executable: "vault-runner",
	autoStart: false,
	stopWithObsidian: true,
	port: 0,
};

export function parsePort(value: string): number | null {
	if (!/^\d{1,5}$/.test(value.trim())) return null;
	const port = Number(value.trim());
	return port <= 65535 ? port : null;
}

export interface SettingsOwner {
	settings: VaultRunnerSettings;
	saveSettings(): Promise<void>;
}

export class VaultRunnerSettingTab extends PluginSettingTab {
	constructor(
		app: App,
		private readonly owner: SettingsOwner & ConstructorParameters<typeof PluginSettingTab>[1],
	) {
		super(app, owner);
	}

	display(): void {
		const { containerEl } = this;
		containerEl.empty();
		new Setting(containerEl)
			.setName("Executable")
			.setDesc("The vault-runner command, or its full path (for example the one in your virtual environment).")
			.addText((text) =>
				text
					.setPlaceholder("vault-runner")
					.setValue(this.owner.settings.executable)
					.onChange(async (value) => {
						this.owner.settings.executable = value.trim() || DEFAULT_SETTINGS.executable;
						await this.owner.saveSettings();
					}),
			);
		new Setting(containerEl)
			.setName("Start the server with Obsidian")
			.setDesc("Start vault-runner serve for this vault when Obsidian opens it and none is running.")
			.addToggle((toggle) =>
				toggle.setValue(this.owner.settings.autoStart).onChange(async (value) => {
					this.owner.settings.autoStart = value;
					await this.owner.saveSettings();
				}),
			);
		new Setting(containerEl)
			.setName("Stop the server with Obsidian")
			.setDesc("Stop the server this plugin started when Obsidian closes (a server you started yourself is left running).")
			.addToggle((toggle) =>
				toggle.setValue(this.owner.settings.stopWithObsidian).onChange(async (value) => {
					this.owner.settings.stopWithObsidian = value;
					await this.owner.saveSettings();
				}),
			);
		new Setting(containerEl)
			.setName("Port")
			.setDesc("The port for a server started by the plugin; 0 lets it pick a free one.")
			.addText((text) =>
				text.setValue(String(this.owner.settings.port)).onChange(async (value) => {
					const port = parsePort(value);
					if (port === null) return;
					this.owner.settings.port = port;
					await this.owner.saveSettings();
				}),
			);
	}
}
