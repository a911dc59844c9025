"""The built Obsidian plugin, shipped inside the Python package so `vault-runner obsidian install`
works without Node: main.js, manifest.json and styles.css, byte for byte those of obsidian-plugin/
(`python obsidian-plugin/scripts/ship_bundle.py` copies them after `npm run build`; a test checks it)."""

PLUGIN_FILES = ("main.js", "manifest.json", "styles.css")
