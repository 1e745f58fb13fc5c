/**
 * Test helpers: a real Durin (DURIN_BIN) in a temp dir, downstream servers that count the
 * calls they get, and small HTTP helpers. Everything binds 127.0.0.1 on port 0 and is
 * stopped by the returned `stop()`/`close()`.
 */
import { spawn, ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as http from "node:http";
import * as os from "node:os";
import * as path from "node:path";
import type { AddressInfo } from "node:net";

/** The Durin binary: DURIN_BIN, else the repository's `target/debug/durin` (this file runs from dist/test/). */
export const DURIN_BIN = process.env.DURIN_BIN || path.resolve(__dirname, "../../../../target/debug/durin");

export interface Durin {
  gw: string;
  admin: string;
  egress: string;
  process: ChildProcess;
  stop(): Promise<void>;
}

/** Starts `durin serve` on free ports with a fresh SQLite database; reads its three addresses. */
export async function startDurin(): Promise<Durin> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "durin-ts-"));
  const child = spawn(
    DURIN_BIN,
    ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--egress-listen", "127.0.0.1:0",
      "--egress-allow", "127.0.0.1", "--database", `sqlite:${dir}/durin.db`],
    { env: { ...process.env, DURIN_LOG: "warn" }, stdio: ["ignore", "pipe", "pipe"] },
  );
  let stderr = "";
  child.stderr!.on("data", (d) => (stderr += d));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGKILL");
      await exited;
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    const urls = await readLines(child, 20_000, {
      gw: /^durin listening on (http:\/\/\S+)/,
      admin: /^durin admin listening on (http:\/\/\S+)/,
      egress: /^durin egress listening on (http:\/\/\S+)/,
    }, () => stderr);
    return { gw: urls.gw, admin: urls.admin, egress: urls.egress, process: child, stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

/** Reads a child's stdout until every pattern matched a line (group 1 is kept), or fails after `timeoutMs`. */
export function readLines<K extends string>(child: ChildProcess, timeoutMs: number, patterns: Record<K, RegExp>,
  stderr: () => string = () => ""): Promise<Record<K, string>> {
  return new Promise((resolve, reject) => {
    const found: Partial<Record<K, string>> = {};
    let buffer = "";
    const done = (error?: Error) => {
      clearTimeout(timer);
      child.stdout!.off("data", onData);
      child.off("exit", onExit);
      error ? reject(error) : resolve(found as Record<K, string>);
    };
    const onData = (data: Buffer) => {
      buffer += data.toString();
      let nl: number;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).trim();
        buffer = buffer.slice(nl + 1);
        for (const key of Object.keys(patterns) as K[]) {
          const m = patterns[key].exec(line);
          if (m && found[key] === undefined) found[key] = m[1];
        }
      }
      if (Object.keys(patterns).every((k) => found[k as K] !== undefined)) done();
    };
    const onExit = (code: number | null) => done(new Error(`process exited (${code}) before printing its addresses: ${stderr()}`));
    const timer = setTimeout(() => done(new Error(`no addresses within ${timeoutMs} ms: ${stderr()}`)), timeoutMs);
    child.stdout!.on("data", onData);
    child.once("exit", onExit);
  });
}

/** Fast retries for tests. */
export const FAST_RETRY = { initial_interval: "50ms", maximum_interval: "500ms", maximum_attempts: 20 };

/** Registers a plain deployment at `url` with `services` on the admin listener. */
export async function register(durin: Durin, url: string, services: unknown): Promise<any> {
  const r = await request("POST", `${durin.admin}/v1/deployments`, { url, services });
  if (r.status >= 300) throw new Error(`register: ${r.status} ${r.text}`);
  return r.json;
}

export interface Reply {
  status: number;
  headers: Headers;
  text: string;
  json: any;
}

/** One HTTP request with a JSON body (a Buffer is sent as is), read whole. */
export async function request(method: string, url: string, body?: unknown, headers: Record<string, string> = {}): Promise<Reply> {
  const init: RequestInit = { method, headers: { ...headers } };
  if (body !== undefined) {
    init.body = Buffer.isBuffer(body) ? body : JSON.stringify(body);
    (init.headers as Record<string, string>)["content-type"] ??= "application/json";
  }
  const response = await fetch(url, init);
  const text = await response.text();
  let json: any;
  try {
    json = text ? JSON.parse(text) : undefined;
  } catch {
    json = undefined;
  }
  return { status: response.status, headers: response.headers, text, json };
}

/** Waits (long-polling) until the invocation has ended; answers it. */
export async function waitEnd(durin: Durin, id: string, timeoutMs = 30_000): Promise<any> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const r = await request("GET", `${durin.gw}/v1/invocations/${id}`, undefined, { prefer: "wait=5" });
    if (["completed", "failed", "cancelled", "terminated", "continued", "paused"].includes(r.json?.status)) return r.json;
    if (Date.now() > end) throw new Error(`invocation ${id} has not ended: ${r.text}`);
  }
}

/** Polls the invocation until `predicate` holds (e.g. it is suspended). */
export async function waitUntil(durin: Durin, id: string, predicate: (inv: any) => boolean, timeoutMs = 15_000): Promise<any> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const r = await request("GET", `${durin.gw}/v1/invocations/${id}`);
    if (r.json && predicate(r.json)) return r.json;
    if (Date.now() > end) throw new Error(`invocation ${id}: condition not met: ${r.text}`);
    await sleep(50);
  }
}

/** Starts an invocation with `/v1/send` and answers its id. */
export async function start(durin: Durin, service: string, handler: string, input: unknown): Promise<string> {
  const r = await request("POST", `${durin.gw}/v1/send/${service}/${handler}`, input);
  if (r.status !== 202) throw new Error(`send: ${r.status} ${r.text}`);
  return r.json.invocation_id;
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface Call {
  method: string;
  path: string;
  key: string | undefined;
  body: string;
}

/**
 * A downstream service that records every request and answers `{path, n, body}` by
 * default. `hold(path)` makes the next requests to `path` wait until released. Requests
 * with an Idempotency-Key already seen get the first answer again, as payment APIs do;
 * `effects(path)` counts distinct keys (the effects applied).
 */
export class Downstream {
  readonly calls: Call[] = [];
  private readonly answers = new Map<string, unknown>();
  private readonly holds = new Map<string, Promise<void>>();
  private server!: http.Server;
  url = "";

  static async start(): Promise<Downstream> {
    const d = new Downstream();
    d.server = http.createServer((req, res) => void d.serve(req, res));
    await new Promise<void>((r) => d.server.listen(0, "127.0.0.1", r));
    d.url = `http://127.0.0.1:${(d.server.address() as AddressInfo).port}`;
    return d;
  }

  private async serve(req: http.IncomingMessage, res: http.ServerResponse) {
    const chunks: Buffer[] = [];
    for await (const c of req) chunks.push(c as Buffer);
    const call: Call = { method: req.method!, path: req.url!, key: req.headers["idempotency-key"] as string | undefined, body: Buffer.concat(chunks).toString() };
    this.calls.push(call);
    const held = this.holds.get(call.path);
    if (held) await held;
    const seen = call.key ? this.answers.get(call.key) : undefined;
    const n = this.count(call.path);
    const answer = seen ?? { path: call.path, n, charge_id: `ch_${n}`, reservation_id: `rs_${n}`, body: parseMaybe(call.body) };
    if (call.key) this.answers.set(call.key, answer);
    const data = JSON.stringify(answer);
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
    res.end(data);
  }

  /** Holds requests to `path` until the returned function is called; `arrived` resolves at the first. */
  hold(p: string): { release: () => void; arrived: Promise<void> } {
    let release!: () => void;
    this.holds.set(p, new Promise<void>((r) => (release = r)));
    const before = this.count(p);
    const arrived = (async () => {
      while (this.count(p) === before) await sleep(20);
    })();
    return { release: () => { this.holds.delete(p); release(); }, arrived };
  }

  count(p: string): number {
    return this.calls.filter((c) => c.path === p).length;
  }

  effects(p: string): number {
    return new Set(this.calls.filter((c) => c.path === p).map((c) => c.key)).size;
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((r) => this.server.close(() => r()));
  }
}

function parseMaybe(text: string): unknown {
  try {
    return text ? JSON.parse(text) : null;
  } catch {
    return text;
  }
}
