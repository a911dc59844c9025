import tseslint from "typescript-eslint";
import obsidianmd from "eslint-plugin-obsidianmd";
import globals from "globals";
import { globalIgnores } from "eslint/config";

export default tseslint.config(
	{
		languageOptions: {
			globals: {
				...globals.browser,
				...globals.node,
			},
			parserOptions: {
				projectService: {
					allowDefaultProject: ["eslint.config.mts", "manifest.json"],
				},
				tsconfigRootDir: import.meta.dirname,
				extraFileExtensions: [".json"],
			},
		},
	},
	...obsidianmd.configs.recommended,
	{
		// These modules also run outside Obsidian (tests under Node and happy-dom), where
		// `window.setTimeout` and Obsidian's `createEl` helpers do not exist.
		files: ["src/client.ts", "src/editor.ts", "src/buttons.ts"],
		rules: {
			"obsidianmd/prefer-window-timers": "off",
			"obsidianmd/prefer-create-el": "off",
		},
	},
	globalIgnores([
		"node_modules",
		"dist",
		"test",
		"scripts",
		"esbuild.config.mjs",
		"eslint.config.mts",
		"version-bump.mjs",
		"vitest.config.ts",
		"versions.json",
		"package.json",
		"package-lock.json",
		"tsconfig*.json",
		"main.js",
	]),
);
