/**
 * The client against a real HTTP server on 127.0.0.1 that speaks SSE the way
 * vault_runner/server.py does: headers sent, errors by code, discovery, the stream parsed
 * across odd chunk boundaries, reconnection with backoff to a server that moved.
 */
import { createHash } from "node:crypto";
import { mkdtemp, mkdir, readFile, realpath, writeFile, rm } from "node:fs/promises";
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
	ApiClient,
	configDir,
	discover,
	EventStream,
	noteTakerMessage,
	SseParser,
	type Connection,
	type HostEnv,
	type SseMessage,
	VaultRunnerError,
	versionsMatch,
} from "../src/client";
import type { ServerEvent } from "../src/protocol";

const TOKEN = "t".repeat(43);
const ORIGIN = "app://obsidian.md";

type Handler = (req: IncomingMessage, res: ServerResponse, body: string) => void;

interface TestServer {
	server: Server;
	url: string;
	port: number;
	requests: { method: string; url: string; headers: IncomingHttpHeaders; body: string }[];
	close(): Promise<void>;
}

const servers: TestServer[] = [];

async function start(handler: Handler): Promise<TestServer> {
	const requests: TestServer["requests"] = [];
	const server = createServer((req, res) => {
		let body = "";
		req.on("data", (chunk: Buffer) => (body += chunk.toString("utf8")));
		req.on("end", () => {
			requests.push({ method: req.method ?? "", url: req.url ?? "", headers: req.headers, body });
			handler(req, res, body);
		});
	});
	await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
	const port = (server.address() as AddressInfo).port;
	const ts: TestServer = {
		server,
		port,
		url: `http://127.0.0.1:${port}`,
		requests,
		close: () =>
			new Promise<void>((resolve) => {
				server.closeAllConnections();
				server.close(() => resolve());
			}),
	};
	servers.push(ts);
	return ts;
}

afterEach(async () => {
	await Promise.all(servers.splice(0).map((s) => s.close()));
});

/** The security checks of vault_runner/api_security.py, in their order. */
function guarded(port: () => number, next: Handler): Handler {
	return (req, res, body) => {
		const host = req.headers.host;
		const allowedHosts = [`127.0.0.1:${port()}`, `localhost:${port()}`, `[::1]:${port()}`];
		const fail = (status: number, code: string, message: string): void => {
			res.writeHead(status, { "Content-Type": "application/json" });
			res.end(JSON.stringify({ error: { code, message } }));
		};
		if (!host || !allowedHosts.includes(host)) return fail(403, "forbidden_host", "bad host");
		if (req.headers.origin !== undefined && req.headers.origin !== ORIGIN) return fail(403, "forbidden_origin", "bad origin");
		if (req.headers.authorization !== `Bearer ${TOKEN}`) return fail(401, "unauthorized", "missing or wrong API token");
		next(req, res, body);
	};
}

function connectionTo(ts: TestServer): Connection {
	return {
		url: ts.url,
		token: TOKEN,
		server: { vault: "/v", url: ts.url, host: "127.0.0.1", port: ts.port, pid: 1, token_file: "/t", version: "0.1.0", started: 0, server_file: "/s" },
	};
}

function sse(kind: string, data: unknown, id?: number): string {
	return (id === undefined ? "" : `id: ${id}\n`) + `event: ${kind}\n` + `data: ${JSON.stringify(data)}\n\n`;
}

function envelope(id: number, kind: string, note: string, data: Record<string, unknown>, index: number | null = null): Record<string, unknown> {
	return { id, time: 1, kind, note, index, line: null, data };
}

describe("discovery", () => {
	it("finds the server file at sha256 of the resolved vault path and reads the token", async () => {
		const root = await mkdtemp(join(tmpdir(), "vr-client-"));
		try {
			const vault = join(root, "My Vault");
			await mkdir(vault);
			const config = join(root, "config");
			await mkdir(join(config, "servers"), { recursive: true });
			const resolved = await realpath(vault);
			const digest = createHash("sha256").update(resolved, "utf8").digest("hex").slice(0, 16);
			await writeFile(join(config, "api-token"), TOKEN + "\n");
			const info = { vault: resolved, url: "http://127.0.0.1:5", host: "127.0.0.1", port: 5, pid: process.pid, token_file: join(config, "api-token"), version: "0.1.0", started: 1, server_file: "x" };
			await writeFile(join(config, "servers", `${digest}.json`), JSON.stringify(info));
			const host: HostEnv = {
				env: { VAULT_RUNNER_CONFIG_DIR: config },
				platform: "linux",
				homedir: "/home/x",
				readFile: (p) => readFile(p, "utf8"),
				realpath: (p) => realpath(p),
				pidAlive: (pid) => pid === process.pid,
			};
			// through a symlink-free but non-normalised path: realpath is what Python's resolve() gives
			const found = await discover(host, join(root, ".", "My Vault"));
			expect(found.token).toBe(TOKEN);
			expect(found.url).toBe("http://127.0.0.1:5");
			await writeFile(join(config, "servers", `${digest}.json`), JSON.stringify({ ...info, version: "0.2.0" }));
			await expect(discover(host, vault)).rejects.toMatchObject({ code: "version_mismatch" });
			await writeFile(join(config, "servers", `${digest}.json`), JSON.stringify({ ...info, pid: 999999999 }));
			await expect(discover(host, vault)).rejects.toMatchObject({ code: "server_missing" });
			await rm(join(config, "servers", `${digest}.json`));
			await expect(discover(host, vault)).rejects.toMatchObject({ code: "server_missing" });
		} finally {
			await rm(root, { recursive: true, force: true });
		}
	});

	it("uses the config dir platformdirs gives vault_runner", () => {
		expect(configDir({ env: {}, platform: "linux", homedir: "/home/me" })).toBe("/home/me/.config/vault-runner");
		expect(configDir({ env: { XDG_CONFIG_HOME: "/x" }, platform: "linux", homedir: "/home/me" })).toBe("/x/vault-runner");
		expect(configDir({ env: {}, platform: "darwin", homedir: "/Users/me" })).toBe("/Users/me/Library/Application Support/vault-runner");
		expect(configDir({ env: { LOCALAPPDATA: "C:\\Users\\me\\AppData\\Local" }, platform: "win32", homedir: "C:\\Users\\me" })).toBe(
			"C:\\Users\\me\\AppData\\Local\\vault-runner\\vault-runner",
		);
		expect(configDir({ env: { VAULT_RUNNER_CONFIG_DIR: "/cfg" }, platform: "linux", homedir: "/h" })).toBe("/cfg");
		expect(versionsMatch("0.1.7")).toBe(true);
		expect(versionsMatch("1.1.0")).toBe(false);
	});
});

describe("ApiClient over real HTTP", () => {
	it("sends the token, JSON and the origin Obsidian sends, to a Host the server accepts", async () => {
		let ts!: TestServer;
		ts = await start(
			guarded(
				() => ts.port,
				(_req, res, body) => {
					res.writeHead(202, { "Content-Type": "application/json" });
					res.end(JSON.stringify({ note: (JSON.parse(body) as { note: string }).note, state: "queued", report: null, error: null }));
				},
			),
		);
		const client = new ApiClient(connectionTo(ts), { extraHeaders: { Origin: ORIGIN } });
		const result = await client.runBlock("PyTorch/01 Tensores.md", { line: 12 });
		expect(result).toEqual({ note: "PyTorch/01 Tensores.md", state: "queued", report: null, error: null });
		const request = ts.requests[0];
		expect(request?.url).toBe("/api/v1/run-block");
		expect(request?.headers.authorization).toBe(`Bearer ${TOKEN}`);
		expect(request?.headers["content-type"]).toBe("application/json");
		expect(request?.headers.origin).toBe(ORIGIN);
		expect(request?.headers.host).toBe(`127.0.0.1:${ts.port}`);
		expect(JSON.parse(request?.body ?? "")).toEqual({ note: "PyTorch/01 Tensores.md", line: 12, wait: false });
	});

	it("maps errors by their code, not their message", async () => {
		const ts = await start((_req, res) => {
			res.writeHead(403, { "Content-Type": "application/json" });
			res.end(JSON.stringify({ error: { code: "vault_not_trusted", message: "whatever the server says today" } }));
		});
		const client = new ApiClient(connectionTo(ts));
		const error = await client.run("a.md").catch((e: unknown) => e);
		expect(error).toBeInstanceOf(VaultRunnerError);
		expect((error as VaultRunnerError).code).toBe("vault_not_trusted");
		expect((error as VaultRunnerError).status).toBe(403);
		const message = noteTakerMessage(error as VaultRunnerError, { vaultPath: "/home/me/My Notes" });
		expect(message).toContain('vault-runner trust "/home/me/My Notes"');
		expect(noteTakerMessage({ code: "server_missing" }, { vaultPath: "/v" })).toContain("vault-runner serve /v");
		expect(noteTakerMessage({ code: "version_mismatch" }, { pluginVersion: "0.1.0", serverVersion: "0.3.0" })).toContain("0.3.0");
	});

	it("says the server is missing when nothing listens", async () => {
		const ts = await start(() => undefined);
		const connection = connectionTo(ts);
		await ts.close();
		await expect(new ApiClient(connection).status()).rejects.toMatchObject({ code: "server_missing" });
	});

	it("posts the editors set and region acknowledgements (PROTOCOL.md)", async () => {
		const ts = await start((req, res, body) => {
			res.writeHead(200, { "Content-Type": "application/json" });
			const parsed = JSON.parse(body) as Record<string, unknown>;
			res.end(JSON.stringify(req.url === "/api/v1/editors" ? { client: parsed.client, open: parsed.open, ignored: [] } : { note: parsed.note, run: parsed.run, accepted: true }));
		});
		const client = new ApiClient(connectionTo(ts));
		expect(await client.editors({ client: "c1", open: ["A.md", "b/C.md"] })).toEqual({ client: "c1", open: ["A.md", "b/C.md"], ignored: [] });
		expect(
			await client.regionsApplied({ client: "c1", note: "A.md", run: "r1", via: "editor", applied: [0], unwritten: [], hand_edited: [], problem: null }),
		).toEqual({ note: "A.md", run: "r1", accepted: true });
	});
});

describe("SseParser", () => {
	it("parses fields, comments, multi-line data and any line ending, across any chunking", () => {
		const stream = ": keep-alive\r\n\r\nid: 7\r\nevent: output\r\ndata: {\"a\":\r\ndata: 1}\r\n\r\nevent: x\rdata: y\r\revent: z\ndata: w\n\n";
		for (let size = 1; size <= stream.length; size++) {
			const got: SseMessage[] = [];
			const parser = new SseParser((m) => got.push(m));
			for (let i = 0; i < stream.length; i += size) parser.push(stream.slice(i, i + size));
			expect(got).toEqual([
				{ event: "output", data: '{"a":\n1}', id: "7" },
				{ event: "x", data: "y", id: "7" },
				{ event: "z", data: "w", id: "7" },
			]);
		}
	});
});

describe("EventStream over real HTTP", () => {
	function streamingServer(script: (res: ServerResponse, attempt: number, req: IncomingMessage) => void): Promise<TestServer> {
		let attempt = 0;
		let ts!: TestServer;
		const ready = start(
			guarded(
				() => ts.port,
				(req, res) => {
					attempt++;
					script(res, attempt, req);
				},
			),
		);
		return ready.then((s) => (ts = s));
	}

	function collect(stream: { events: ServerEvent[] }, count: number, timeoutMs = 8000): Promise<void> {
		return new Promise((resolve, reject) => {
			const started = Date.now();
			const check = (): void => {
				if (stream.events.length >= count) resolve();
				else if (Date.now() - started > timeoutMs) reject(new Error(`only ${stream.events.length} events`));
				else setTimeout(check, 10);
			};
			check();
		});
	}

	it("streams events as they arrive, reconnects after a drop with Last-Event-ID, and to a server that moved", async () => {
		const first = await streamingServer((res) => {
			res.writeHead(200, { "Content-Type": "text/event-stream", "X-Accel-Buffering": "no" });
			res.write(sse("ready", { note: null, time: 1 }));
			const event = sse("block-started", envelope(1, "block-started", "A.md", {}, 0), 1) + ": keep-alive\n\n";
			// split inside a field and inside a multi-byte character
			const bytes = Buffer.from(event + sse("output", envelope(2, "output", "A.md", { type: "stream", name: "stdout", text: "ñ🧪\n" }, 0), 2));
			res.write(bytes.subarray(0, 10));
			setTimeout(() => res.write(bytes.subarray(10, bytes.length - 9)), 20);
			setTimeout(() => {
				res.write(bytes.subarray(bytes.length - 9));
			}, 40);
			setTimeout(() => res.destroy(), 90); // the server went away, abruptly
		});
		const second = await streamingServer((res) => {
			res.writeHead(200, { "Content-Type": "text/event-stream" });
			res.write(sse("ready", { note: null, time: 2 }));
			res.write(sse("note-finished", envelope(3, "note-finished", "A.md", { status: "ran", written: false }), 3));
		});
		const sink = { events: [] as ServerEvent[] };
		const states: string[] = [];
		let connects = 0;
		const stream = new EventStream({
			connect: async () => (++connects === 1 ? connectionTo(first) : connectionTo(second)),
			onEvent: (e) => sink.events.push(e),
			onState: (s) => states.push(s),
			client: "client-1",
			extraHeaders: { Origin: ORIGIN },
			initialDelayMs: 20,
			maxDelayMs: 100,
		});
		stream.start();
		try {
			await collect(sink, 5);
		} finally {
			stream.close();
		}
		expect(sink.events.map((e) => e.kind)).toEqual(["ready", "block-started", "output", "ready", "note-finished"]);
		expect(sink.events[2]?.data).toEqual({ type: "stream", name: "stdout", text: "ñ🧪\n" });
		expect(sink.events[2]?.index).toBe(0);
		expect(connects).toBe(2);
		expect(stream.connections).toBe(2);
		const req1 = first.requests[0];
		const req2 = second.requests[0];
		expect(req1?.url).toBe("/api/v1/events?client=client-1");
		expect(req1?.headers.authorization).toBe(`Bearer ${TOKEN}`);
		expect(req1?.headers.accept).toBe("text/event-stream");
		expect(req1?.headers.origin).toBe(ORIGIN);
		expect(req1?.headers["last-event-id"]).toBeUndefined();
		expect(req2?.headers["last-event-id"]).toBe("2");
		expect(states).toContain("waiting");
		expect(states[states.length - 1]).toBe("closed");
	});

	it("backs off while the server refuses (too_many_streams, shutting_down) and says why", async () => {
		const ts = await streamingServer((res, attempt) => {
			if (attempt <= 2) {
				res.writeHead(attempt === 1 ? 429 : 503, { "Content-Type": "application/json" });
				res.end(JSON.stringify({ error: { code: attempt === 1 ? "too_many_streams" : "shutting_down", message: "no" } }));
				return;
			}
			res.writeHead(200, { "Content-Type": "text/event-stream" });
			res.write(sse("ready", { note: null, time: 3 }));
		});
		const sink = { events: [] as ServerEvent[] };
		const errors: (string | null)[] = [];
		const stream = new EventStream({
			connect: async () => connectionTo(ts),
			onEvent: (e) => sink.events.push(e),
			onState: (s, e) => {
				if (s === "waiting") errors.push(e?.code ?? null);
			},
			initialDelayMs: 20,
			random: () => 0.5,
		});
		expect([1, 2, 3, 10].map((n) => stream.delayFor(n))).toEqual([20, 40, 80, 10240]);
		stream.start();
		try {
			await collect(sink, 1);
		} finally {
			stream.close();
		}
		expect(errors).toEqual(["too_many_streams", "shutting_down"]);
		expect(ts.requests.length).toBe(3);
	});

	it("reconnects when the stream goes silent past the idle timeout", async () => {
		const ts = await streamingServer((res) => {
			res.writeHead(200, { "Content-Type": "text/event-stream" });
			res.write(sse("ready", { note: null, time: 4 })); // and then nothing, not even keep-alives
		});
		const sink = { events: [] as ServerEvent[] };
		const stream = new EventStream({
			connect: async () => connectionTo(ts),
			onEvent: (e) => sink.events.push(e),
			idleTimeoutMs: 150,
			initialDelayMs: 10,
		});
		stream.start();
		try {
			await collect(sink, 2);
		} finally {
			stream.close();
		}
		expect(ts.requests.length).toBeGreaterThanOrEqual(2);
	});

	it("gives up nothing when discovery fails: it waits and tries again", async () => {
		const ts = await streamingServer((res) => {
			res.writeHead(200, { "Content-Type": "text/event-stream" });
			res.write(sse("ready", { note: null, time: 5 }));
		});
		let calls = 0;
		const codes: string[] = [];
		const sink = { events: [] as ServerEvent[] };
		const stream = new EventStream({
			connect: async () => {
				if (++calls < 3) throw new VaultRunnerError("server_missing", "no server file");
				return connectionTo(ts);
			},
			onEvent: (e) => sink.events.push(e),
			onState: (s, e) => {
				if (e) codes.push(e.code);
			},
			initialDelayMs: 10,
		});
		stream.start();
		try {
			await collect(sink, 1);
		} finally {
			stream.close();
		}
		expect(codes).toEqual(["server_missing", "server_missing"]);
	});
});
