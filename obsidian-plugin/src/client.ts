/**
 * The client of `vault-runner serve`: finds the server of this vault, sends its token, calls
 * the API and follows the event stream.
 *
 * - Discovery: `<config dir>/servers/<first 16 hex of sha256(resolved vault path)>.json`
 *   (vault_runner/server_cli.py `server_file`), config dir as vault_runner/trust.py
 *   `config_dir` (platformdirs), token read from the file named by `token_file`.
 * - Requests use `fetch`. In Obsidian the renderer adds `Origin: app://obsidian.md` itself
 *   (a page cannot set Origin); the server allows exactly that origin and answers the CORS
 *   preflight that `Authorization` causes. Tests outside Obsidian pass the header explicitly.
 * - Events: `EventSource` cannot send `Authorization` and `requestUrl` cannot stream, so the
 *   stream is a `fetch` whose body is read as it arrives, parsed as Server-Sent Events, and
 *   reconnected with exponential backoff (each attempt finds the server again: a restarted
 *   server has a new port).
 * - Errors are told apart by the API's stable `code`, never by message text.
 */

import type {
	CancelResult,
	EditorsRequest,
	EditorsResult,
	ErrorBody,
	InterruptResult,
	NoteResults,
	RegionsAppliedRequest,
	RegionsAppliedResult,
	RestartResult,
	RunResult,
	ServerEvent,
	ServerFile,
	Status,
} from "./protocol";
import { API_PREFIX, PROTOCOL_VERSION } from "./protocol";
import { sha256Hex } from "./sha256";

// -- errors ------------------------------------------------------------------------------------

/** Codes the client itself gives, beside the API's ErrorBody codes. */
export type ClientCode =
	| "server_missing" // no server file, or nothing listens where it says
	| "server_file_invalid"
	| "token_missing"
	| "version_mismatch"
	| "bad_response"
	| "network";

export class VaultRunnerError extends Error {
	constructor(
		/** ErrorBody.code from the API, or a ClientCode */
		readonly code: string,
		message: string,
		readonly status: number | null = null,
		/** the server's own message, when it sent one */
		readonly serverMessage: string | null = null,
	) {
		super(message);
		this.name = "VaultRunnerError";
	}
}

export interface MessageContext {
	/** the vault's absolute path, for the commands we tell the note-taker to run */
	vaultPath?: string;
	pluginVersion?: string;
	serverVersion?: string;
}

function quoted(path: string | undefined): string {
	if (!path) return "VAULT";
	return /^[\w./-]+$/.test(path) ? path : `"${path.replace(/(["\\$`])/g, "\\$1")}"`;
}

/** What to tell a note-taker, chosen by the error's code. */
export function noteTakerMessage(error: { code: string; serverMessage?: string | null; message?: string }, context: MessageContext = {}): string {
	const vault = quoted(context.vaultPath);
	switch (error.code) {
		case "server_missing":
			return `vault-runner is not running for this vault. Start it in a terminal with: vault-runner serve ${vault} (or turn on "Start the server with Obsidian" in the plugin's settings).`;
		case "server_file_invalid":
		case "token_missing":
			return `vault-runner's server file or token could not be read. Restart it: vault-runner serve ${vault}`;
		case "vault_not_trusted":
			return `This vault is not trusted, so vault-runner will not run its code. If you trust these notes, run in a terminal: vault-runner trust ${vault}`;
		case "version_mismatch":
			return `This plugin (${context.pluginVersion ?? "?"}) does not match vault-runner serve (${context.serverVersion ?? "?"}). Update both: pip install -U vault-runner, then vault-runner obsidian install ${vault}`;
		case "unauthorized":
			return "vault-runner refused the plugin's token. Restart vault-runner serve, then reload the plugin.";
		case "forbidden_origin":
		case "forbidden_host":
			return "vault-runner refused the connection from Obsidian. Update vault-runner, or start it with --allow-origin app://obsidian.md";
		case "not_opted_in":
			return "This note does not run yet: add the property vault-runner: true (a checkbox in the Properties panel).";
		case "unknown_note":
			return "vault-runner cannot find this note. Save it first, and check that it is inside the vault.";
		case "unknown_block":
			return "There is no python block at the cursor.";
		case "invalid_path":
			return "vault-runner only runs notes inside the vault, outside hidden folders.";
		case "invalid_note":
			return `This note cannot be run as it is: ${error.serverMessage ?? "fix it and try again"}`;
		case "too_many_streams":
			return "vault-runner has too many connections open. Reload the plugin, or restart vault-runner serve.";
		case "shutting_down":
			return "vault-runner is shutting down. Start it again to run notes.";
		case "payload_too_large":
			return "That request is too large for vault-runner.";
		case "cancelled":
			return "The run was cancelled.";
		case "interrupted":
			return "The block was stopped.";
		case "timeout":
			return "A block ran past its timeout and was stopped; its output shows where it was.";
		case "kernel_died":
			return "The Python kernel crashed (out of memory?). The next run starts a fresh one.";
		case "block_error":
			return "A block raised an error; the note shows it under the block.";
		case "hand_edited":
			return "An output region was edited by hand, so it was left as it is. Move your text out of it and run again.";
		case "conflict":
			return "The note changed while it ran; the blocks you edited will get their output on the next run.";
		case "network":
			return "vault-runner stopped answering. Is it still running?";
		default:
			return error.serverMessage ?? error.message ?? `vault-runner: ${error.code}`;
	}
}

// -- finding the server ---------------------------------------------------------------------------

/** What discovery needs from the machine (Node's fs/os/process in Obsidian; fakes in tests). */
export interface HostEnv {
	env: Record<string, string | undefined>;
	platform: string;
	homedir: string;
	readFile(path: string): Promise<string>;
	realpath(path: string): Promise<string>;
	/** is a process with this id alive (process.kill(pid, 0)) */
	pidAlive?(pid: number): boolean;
}

function join(platform: string, ...parts: string[]): string {
	const sep = platform === "win32" ? "\\" : "/";
	return parts.map((p, i) => (i === 0 ? p.replace(/[\\/]+$/, "") : p.replace(/^[\\/]+|[\\/]+$/g, ""))).join(sep);
}

/** vault_runner/trust.py `config_dir`: $VAULT_RUNNER_CONFIG_DIR, else platformdirs' user config dir. */
export function configDir(host: Pick<HostEnv, "env" | "platform" | "homedir">): string {
	const override = host.env.VAULT_RUNNER_CONFIG_DIR;
	if (override) return override;
	if (host.platform === "darwin") return join("darwin", host.homedir, "Library", "Application Support", "vault-runner");
	if (host.platform === "win32") {
		const base = host.env.LOCALAPPDATA || join("win32", host.homedir, "AppData", "Local");
		return join("win32", base, "vault-runner", "vault-runner");
	}
	const xdg = (host.env.XDG_CONFIG_HOME ?? "").trim();
	return join(host.platform, xdg || join(host.platform, host.homedir, ".config"), "vault-runner");
}

/** vault_runner/server_cli.py `server_file`. */
export async function serverFilePath(host: HostEnv, vaultPath: string): Promise<string> {
	// Python's Path.resolve() is not strict: a path that cannot be resolved is used as it is.
	const resolved = await host.realpath(vaultPath).catch(() => vaultPath);
	return join(host.platform, configDir(host), "servers", sha256Hex(resolved).slice(0, 16) + ".json");
}

export interface Connection {
	url: string;
	token: string;
	server: ServerFile;
}

function errno(error: unknown): string | undefined {
	return typeof error === "object" && error !== null && "code" in error ? String(error.code) : undefined;
}

function isServerFile(value: unknown): value is ServerFile {
	if (typeof value !== "object" || value === null) return false;
	const v = value as Record<string, unknown>;
	return typeof v.url === "string" && typeof v.token_file === "string" && typeof v.version === "string" && typeof v.port === "number";
}

/** "0.1.3" and "0.1" are compatible; "0.2.0" is not (major.minor must match). */
export function versionsMatch(server: string, protocol: string = PROTOCOL_VERSION): boolean {
	const [a, b] = [server.split("."), protocol.split(".")];
	return a[0] === b[0] && a[1] === b[1];
}

/** Read the server file and the token of the vault's server; throws VaultRunnerError. */
export async function discover(host: HostEnv, vaultPath: string): Promise<Connection> {
	const path = await serverFilePath(host, vaultPath);
	let raw: string;
	try {
		raw = await host.readFile(path);
	} catch (error) {
		if (errno(error) === "ENOENT" || errno(error) === "ENOTDIR")
			throw new VaultRunnerError("server_missing", `no server file at ${path}`);
		throw new VaultRunnerError("server_file_invalid", `${path}: ${String(error)}`);
	}
	let parsed: unknown;
	try {
		parsed = JSON.parse(raw);
	} catch {
		throw new VaultRunnerError("server_file_invalid", `${path}: not JSON`);
	}
	if (!isServerFile(parsed)) throw new VaultRunnerError("server_file_invalid", `${path}: missing url, port, token_file or version`);
	if (typeof parsed.pid === "number" && host.pidAlive && !host.pidAlive(parsed.pid))
		throw new VaultRunnerError("server_missing", `the server of ${path} (pid ${parsed.pid}) is gone`);
	if (!versionsMatch(parsed.version))
		throw new VaultRunnerError("version_mismatch", `server ${parsed.version}, plugin speaks ${PROTOCOL_VERSION}`);
	let token: string;
	try {
		token = (await host.readFile(parsed.token_file)).trim();
	} catch (error) {
		throw new VaultRunnerError("token_missing", `${parsed.token_file}: ${String(error)}`);
	}
	if (!token) throw new VaultRunnerError("token_missing", `${parsed.token_file} is empty`);
	return { url: parsed.url.replace(/\/+$/, ""), token, server: parsed };
}

// -- the API ---------------------------------------------------------------------------------------

export type FetchLike = (input: string, init?: RequestInit) => Promise<Response>;

export interface ClientOptions {
	fetch?: FetchLike;
	/** headers a browser would add itself; only tests outside Obsidian set `Origin` here */
	extraHeaders?: Record<string, string>;
}

function isErrorResponse(value: unknown): value is { error: ErrorBody } {
	if (typeof value !== "object" || value === null || !("error" in value)) return false;
	const error = value.error;
	return typeof error === "object" && error !== null && typeof (error as { code?: unknown }).code === "string";
}

export async function errorFromResponse(response: Response): Promise<VaultRunnerError> {
	let body: unknown = null;
	try {
		body = await response.json();
	} catch {
		// not JSON
	}
	if (isErrorResponse(body)) return new VaultRunnerError(body.error.code, body.error.message, response.status, body.error.message);
	return new VaultRunnerError("bad_response", `HTTP ${response.status}`, response.status);
}

export class ApiClient {
	private readonly fetchImpl: FetchLike;

	constructor(
		readonly connection: Connection,
		private readonly options: ClientOptions = {},
	) {
		// fetch, not requestUrl: requestUrl cannot stream, and one HTTP client serves both
		this.fetchImpl = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
	}

	headers(extra: Record<string, string> = {}): Record<string, string> {
		return { Authorization: `Bearer ${this.connection.token}`, Accept: "application/json", ...this.options.extraHeaders, ...extra };
	}

	async request<T>(method: "GET" | "POST", path: string, body?: unknown, signal?: AbortSignal): Promise<T> {
		const init: RequestInit = {
			method,
			headers: this.headers(body === undefined ? {} : { "Content-Type": "application/json" }),
			signal,
		};
		if (body !== undefined) init.body = JSON.stringify(body);
		let response: Response;
		try {
			response = await this.fetchImpl(this.connection.url + path, init);
		} catch (error) {
			if (signal?.aborted) throw error;
			throw new VaultRunnerError("server_missing", `${this.connection.url}: ${String(error)}`);
		}
		if (!response.ok) throw await errorFromResponse(response);
		try {
			return (await response.json()) as T;
		} catch {
			throw new VaultRunnerError("bad_response", `${path}: the answer is not JSON`, response.status);
		}
	}

	status(): Promise<Status> {
		return this.request<Status>("GET", `${API_PREFIX}/status`);
	}
	run(note: string, wait = false): Promise<RunResult> {
		return this.request<RunResult>("POST", `${API_PREFIX}/run`, { note, wait });
	}
	runBlock(note: string, at: { index: number } | { line: number }, wait = false): Promise<RunResult> {
		return this.request<RunResult>("POST", `${API_PREFIX}/run-block`, { note, ...at, wait });
	}
	runAll(note: string, wait = false): Promise<RunResult> {
		return this.request<RunResult>("POST", `${API_PREFIX}/run-all`, { note, wait });
	}
	interrupt(note: string): Promise<InterruptResult> {
		return this.request<InterruptResult>("POST", `${API_PREFIX}/interrupt`, { note });
	}
	restart(note: string): Promise<RestartResult> {
		return this.request<RestartResult>("POST", `${API_PREFIX}/restart`, { note });
	}
	cancel(note: string): Promise<CancelResult> {
		return this.request<CancelResult>("POST", `${API_PREFIX}/cancel`, { note });
	}
	results(note: string): Promise<NoteResults> {
		return this.request<NoteResults>("GET", `${API_PREFIX}/results?note=${encodeURIComponent(note)}`);
	}
	/** NEW (PROTOCOL.md): the notes this window holds open in an editor. */
	editors(request: EditorsRequest): Promise<EditorsResult> {
		return this.request<EditorsResult>("POST", `${API_PREFIX}/editors`, request);
	}
	/** NEW (PROTOCOL.md): what the plugin did with a `regions` event. */
	regionsApplied(request: RegionsAppliedRequest): Promise<RegionsAppliedResult> {
		return this.request<RegionsAppliedResult>("POST", `${API_PREFIX}/regions-applied`, request);
	}
}

// -- Server-Sent Events ------------------------------------------------------------------------------

export interface SseMessage {
	event: string;
	data: string;
	id: string | null;
}

/** An incremental parser of text/event-stream (the WHATWG rules: fields, comments, CR/LF/CRLF). */
export class SseParser {
	private buffer = "";
	private event = "";
	private data: string[] = [];
	private id: string | null = null;
	lastEventId: string | null = null;
	retry: number | null = null;
	private pendingCR = false;

	constructor(private readonly onMessage: (message: SseMessage) => void) {}

	push(chunk: string): void {
		let text = chunk;
		if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
		this.pendingCR = false;
		this.buffer += text;
		for (;;) {
			const match = /\r\n|\r|\n/.exec(this.buffer);
			if (!match) break;
			if (match[0] === "\r" && match.index === this.buffer.length - 1) {
				// a CR at the end of a chunk may be the first half of a CRLF
				this.pendingCR = true;
			}
			const line = this.buffer.slice(0, match.index);
			this.buffer = this.buffer.slice(match.index + match[0].length);
			this.line(line);
		}
	}

	private line(line: string): void {
		if (line === "") {
			if (this.data.length) {
				if (this.id !== null) this.lastEventId = this.id;
				this.onMessage({ event: this.event || "message", data: this.data.join("\n"), id: this.lastEventId });
			}
			this.event = "";
			this.data = [];
			this.id = null;
			return;
		}
		if (line.startsWith(":")) return; // a comment: the server's keep-alive
		const colon = line.indexOf(":");
		const field = colon < 0 ? line : line.slice(0, colon);
		let value = colon < 0 ? "" : line.slice(colon + 1);
		if (value.startsWith(" ")) value = value.slice(1);
		if (field === "event") this.event = value;
		else if (field === "data") this.data.push(value);
		else if (field === "id" && !value.includes("\0")) this.id = value;
		else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
	}
}

export type StreamState = "connecting" | "open" | "waiting" | "closed";

export interface EventStreamOptions {
	/** find the server and its token again (called before every attempt) */
	connect: () => Promise<Connection>;
	onEvent: (event: ServerEvent) => void;
	onState?: (state: StreamState, error: VaultRunnerError | null) => void;
	/** `?client=` of the stream (PROTOCOL.md) */
	client?: string;
	/** `?note=`: only this note's events */
	note?: string;
	fetch?: FetchLike;
	extraHeaders?: Record<string, string>;
	/** first retry delay, doubled on each failure up to maxDelayMs (with jitter) */
	initialDelayMs?: number;
	maxDelayMs?: number;
	/** no byte for this long (the server sends a comment every 15 s): reconnect */
	idleTimeoutMs?: number;
	random?: () => number;
}

/**
 * The event stream, kept open: reconnects after a drop, a server restart or a refused
 * attempt, with exponential backoff, until `close()`.
 */
export class EventStream {
	private closed = false;
	private controller: AbortController | null = null;
	private attempt = 0;
	private timer: ReturnType<typeof setTimeout> | null = null;
	private lastEventId: string | null = null;
	private wake: (() => void) | null = null;
	state: StreamState = "closed";
	/** number of connections that reached `ready`, for tests and the status bar */
	connections = 0;

	constructor(private readonly options: EventStreamOptions) {}

	start(): void {
		this.closed = false;
		void this.loop();
	}

	close(): void {
		this.closed = true;
		this.controller?.abort();
		if (this.timer) clearTimeout(this.timer);
		this.wake?.();
		this.setState("closed", null);
	}

	/** Try again now (after the server was started, say) instead of waiting out the backoff. */
	retryNow(): void {
		this.attempt = 0;
		if (this.timer) clearTimeout(this.timer);
		this.wake?.();
	}

	private setState(state: StreamState, error: VaultRunnerError | null): void {
		this.state = state;
		this.options.onState?.(state, error);
	}

	delayFor(attempt: number): number {
		const first = this.options.initialDelayMs ?? 500;
		const most = this.options.maxDelayMs ?? 30000;
		const base = Math.min(most, first * 2 ** Math.max(0, attempt - 1));
		const random = this.options.random ?? Math.random;
		return Math.round(base * (0.75 + 0.5 * random()));
	}

	private async loop(): Promise<void> {
		while (!this.closed) {
			let failure: VaultRunnerError | null = null;
			try {
				this.setState("connecting", null);
				await this.once();
			} catch (error) {
				failure = error instanceof VaultRunnerError ? error : new VaultRunnerError("network", String(error));
			}
			if (this.closed) break;
			this.attempt++;
			this.setState("waiting", failure);
			await new Promise<void>((resolve) => {
				this.wake = resolve;
				this.timer = setTimeout(resolve, this.delayFor(this.attempt));
			});
			this.wake = null;
		}
	}

	private async once(): Promise<void> {
		const connection = await this.options.connect();
		const params = new URLSearchParams();
		if (this.options.note) params.set("note", this.options.note);
		if (this.options.client) params.set("client", this.options.client);
		const query = params.toString();
		const url = `${connection.url}${API_PREFIX}/events${query ? "?" + query : ""}`;
		const controller = new AbortController();
		this.controller = controller;
		const headers: Record<string, string> = {
			Authorization: `Bearer ${connection.token}`,
			Accept: "text/event-stream",
			"Cache-Control": "no-cache",
			...this.options.extraHeaders,
		};
		if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
		// fetch, not EventSource (it cannot send Authorization) nor requestUrl (it cannot stream)
		const fetchImpl = this.options.fetch ?? ((input: string, init?: RequestInit) => globalThis.fetch(input, init));
		let response: Response;
		try {
			response = await fetchImpl(url, { method: "GET", headers, signal: controller.signal });
		} catch (error) {
			if (this.closed) return;
			throw new VaultRunnerError("server_missing", `${url}: ${String(error)}`);
		}
		if (!response.ok) throw await errorFromResponse(response);
		if (!response.body) throw new VaultRunnerError("bad_response", "the event stream has no body");
		const reader = response.body.getReader();
		const decoder = new TextDecoder("utf-8");
		let idle: ReturnType<typeof setTimeout> | null = null;
		const idleMs = this.options.idleTimeoutMs ?? 45000;
		const touch = (): void => {
			if (idle) clearTimeout(idle);
			idle = setTimeout(() => controller.abort(), idleMs);
		};
		const parser = new SseParser((message) => {
			if (message.id !== null) this.lastEventId = message.id;
			let parsed: unknown;
			try {
				parsed = JSON.parse(message.data);
			} catch {
				return; // not ours
			}
			const event = normaliseEvent(message.event, parsed);
			if (event.kind === "ready") {
				this.attempt = 0;
				this.connections++;
				this.setState("open", null);
			}
			this.options.onEvent(event);
		});
		touch();
		try {
			for (;;) {
				const { done, value } = await reader.read();
				if (done) break;
				touch();
				parser.push(decoder.decode(value, { stream: true }));
			}
			parser.push(decoder.decode());
		} catch (error) {
			if (this.closed) return;
			throw new VaultRunnerError("network", `the event stream broke: ${String(error)}`);
		} finally {
			if (idle) clearTimeout(idle);
			this.controller = null;
		}
		if (!this.closed) throw new VaultRunnerError("network", "the event stream ended");
	}
}

/** `ready`, `overflow` and `closing` carry their data bare; every other kind is the envelope. */
function normaliseEvent(kind: string, parsed: unknown): ServerEvent {
	const object = typeof parsed === "object" && parsed !== null ? (parsed as Record<string, unknown>) : {};
	if ("kind" in object && "data" in object) {
		return {
			id: typeof object.id === "number" ? object.id : undefined,
			time: typeof object.time === "number" ? object.time : undefined,
			kind: typeof object.kind === "string" ? object.kind : kind,
			note: typeof object.note === "string" ? object.note : null,
			index: typeof object.index === "number" ? object.index : null,
			line: typeof object.line === "number" ? object.line : null,
			data: typeof object.data === "object" && object.data !== null ? (object.data as Record<string, unknown>) : {},
		};
	}
	return { kind, note: typeof object.note === "string" ? object.note : null, data: object };
}
