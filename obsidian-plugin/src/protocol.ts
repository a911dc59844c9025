/**
 * The wire protocol between this plugin and `vault-runner serve`.
 *
 * Everything the plugin and the server say to each other is typed here, in one file:
 * - the shapes of docs/openapi.json that the plugin uses (they exist in the server today),
 * - the extensions for contract 11 ("the editor owns the open note"), which the server
 *   implements: `POST /api/v1/editors`, `POST /api/v1/regions-applied`, the
 *   `client` query parameter of `GET /api/v1/events` and the SSE event kind `regions`.
 *   PROTOCOL.md describes them precisely, for the Python side.
 */

export const API_PREFIX = "/api/v1";

/** The API version this plugin speaks; the server's `version` must share its major.minor. */
export const PROTOCOL_VERSION = "0.1";

// -- the server file -------------------------------------------------------------------------

/** `<config dir>/servers/<first 16 hex of sha256(resolved vault path)>.json` */
export interface ServerFile {
	vault: string;
	url: string;
	host: string;
	port: number;
	pid: number;
	token_file: string;
	version: string;
	started: number;
	server_file: string;
}

// -- errors ----------------------------------------------------------------------------------

/** ErrorBody.code in docs/openapi.json: stable, machine-readable. */
export type ErrorCode =
	| "invalid_path"
	| "unauthorized"
	| "forbidden_host"
	| "forbidden_origin"
	| "vault_not_trusted"
	| "not_opted_in"
	| "unknown_note"
	| "unknown_block"
	| "not_found"
	| "method_not_allowed"
	| "cancelled"
	| "payload_too_large"
	| "unsupported_media_type"
	| "invalid_request"
	| "invalid_note"
	| "too_many_streams"
	| "internal_error"
	| "shutting_down"
	| "kernel_died"
	| "timeout"
	| "interrupted"
	| "conflict"
	| "run_failed"
	| "block_error"
	| "hand_edited";

export interface ErrorBody {
	/** one of ErrorCode; a newer server may send codes this plugin does not know */
	code: string;
	message: string;
}

export interface ErrorResponse {
	error: ErrorBody;
}

// -- results (docs/openapi.json components) -----------------------------------------------------

export interface Output {
	type: string; // stream | execute_result | display_data | error
	name?: string | null;
	text?: string | null;
	mime?: string[] | null;
	ename?: string | null;
	evalue?: string | null;
	[extra: string]: unknown;
}

export interface BlockResult {
	note: string;
	index: number;
	line: number;
	first_line: string;
	label?: string | null;
	/** ok | raised | error | timeout | dead | skipped | not-run | current | stale | hand-edited | unwritten */
	status: string;
	duration?: number;
	device?: string | null;
	outputs?: Output[];
	attachments?: string[];
	message?: string | null;
	gpu_peak_bytes?: number | null;
	[extra: string]: unknown;
}

export interface NoteResult {
	note: string;
	/** ran | current | stale | not-opted-in | no-blocks | refused | failed */
	status: string;
	written?: boolean;
	duration?: number;
	device?: string | null;
	blocks?: BlockResult[];
	message?: string | null;
	warnings?: string[];
	[extra: string]: unknown;
}

export interface RunResult {
	note: string;
	state: "finished" | "queued";
	report?: NoteResult | null;
	error?: ErrorBody | null;
}

export interface InterruptResult {
	note: string;
	interrupted: boolean;
}

export interface RestartResult {
	note: string;
	restarted: boolean;
}

export interface CancelResult {
	note: string;
	cancelled: boolean;
}

export interface NoteResults {
	note: string;
	source: "last-run" | "note";
	up_to_date: boolean;
	opted_in: boolean;
	report: NoteResult;
}

export interface Status {
	vault: string;
	trusted: boolean;
	watching: boolean;
	queued: string[];
	running: Record<string, unknown>[];
	notes: Record<string, unknown>[];
	kernels: Record<string, unknown>;
	devices: Record<string, unknown>;
	sandbox: Record<string, unknown> | null;
	versions: Record<string, string | null>;
	streams: number;
	refused: Record<string, number>;
	[extra: string]: unknown;
}

// -- requests --------------------------------------------------------------------------------

export interface RunRequest {
	note: string;
	wait?: boolean;
}

export type RunBlockRequest = { note: string; index: number; wait?: boolean } | { note: string; line: number; wait?: boolean };

// -- events (GET /api/v1/events) ---------------------------------------------------------------

/** The envelope of every SSE event: `event:` is `kind`, `data:` this object (server.event_json). */
export interface ServerEvent<D = Record<string, unknown>> {
	id?: number;
	time?: number;
	kind: string;
	note: string | null;
	index?: number | null;
	line?: number | null;
	data: D;
}

// -- contract 11: the editor owns the open note (PROTOCOL.md) ----------------------------------

/**
 * `POST /api/v1/editors`: the notes this Obsidian window holds open in an editor. Each
 * request replaces the whole set for `client`. Sent on connect, whenever the set changes
 * (debounced), and with `open: []` on unload.
 */
export interface EditorsRequest {
	/** random id of this plugin instance, also sent as `?client=` on its event stream */
	client: string;
	/** vault-relative paths with `/`, as in every other request */
	open: string[];
}

export interface EditorsResult {
	client: string;
	/** the paths accepted (normalised as the server names notes in events) */
	open: string[];
	/** paths refused, each with the code it would get elsewhere (invalid_path, unknown_note) */
	ignored: { note: string; code: string }[];
}

/** One block of the note as it ran: what the plugin needs to find it again and write it. */
export interface RegionUpdate {
	/** the block's index among the note's python blocks when it ran (for reports only) */
	index: number;
	/** the block's code as it ran: fence content, container prefix removed, LF endings */
	code: string;
	/** `code=` of the region to write; null: the block does not run (eval: false), remove its region */
	code_hash: string | null;
	/** the new region body (LF endings, no markers, no prefix); null: leave this block's region as it is */
	region: string | null;
}

/** `data` of an SSE event of kind `regions` (envelope `note` names the note). */
export interface RegionsEventData {
	/** the run's id, echoed in POST /api/v1/regions-applied */
	run: string;
	/** every python block of the note as it ran, in note order (eval: false ones included) */
	updates: RegionUpdate[];
	/** true when the run was asked with --force semantics: hand-edited regions are overwritten */
	force?: boolean;
}

/** `POST /api/v1/regions-applied`: what the plugin did with a `regions` event. */
export interface RegionsAppliedRequest {
	client: string;
	note: string;
	run: string;
	/** how it was written: into the open editor, or into the file with Vault.process */
	via: "editor" | "file" | "none";
	/** indices (RegionUpdate.index) whose region was written or removed */
	applied: number[];
	/** indices that ran but whose code is no longer in the note (status `unwritten`) */
	unwritten: number[];
	/** indices left alone because their region was edited by hand (status `hand-edited`) */
	hand_edited: number[];
	/** set when nothing could be written: the note has an unclosed fence or a broken region */
	problem?: string | null;
}

export interface RegionsAppliedResult {
	note: string;
	run: string;
	accepted: boolean;
}
