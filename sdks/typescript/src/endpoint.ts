/**
 * The endpoint: an HTTP server (node:http) that Durin calls, one request per attempt, at
 * `POST /{service}/{handler}`. It builds the attempt's {@link Context}, runs the handler and
 * turns its result or error into the answer that the plain contract documents.
 */
import * as http from "node:http";
import * as crypto from "node:crypto";
import { Context } from "./context";
import { Cancelled, ContinuedAsNew, Suspended, TerminalError } from "./errors";

/** A handler: the attempt's context and the caller's body (parsed JSON; `null` when empty). */
export type Handler<I = any, O = any> = (ctx: Context, input: I) => Promise<O> | O;

/** A handler's declaration for `POST /v1/deployments` (see durin.yaml); all optional. */
export interface HandlerOptions {
  /** Default `/{service}/{handler}`. */
  path?: string;
  /** e.g. `{initial_interval: "100ms", maximum_attempts: 5}`. */
  retry_policy?: Record<string, unknown>;
  start_to_close?: string;
  heartbeat_timeout?: string;
  /**
   * Keyed: invocations with the same key run at most `limit` (default 1) at a time, the
   * others wait in arrival order (docs/keys.md). The key is read in a request header or
   * at a JSON pointer in the input: `{pointer: "/account"}`, `{header: "x-tenant", limit: 2}`.
   */
  key?: { header?: string; pointer?: string; limit?: number };
  [more: string]: unknown;
}

export interface EndpointOptions {
  /** The gateway (Durin's main listener), for the context API: `http://127.0.0.1:8080`. */
  durinUrl: string;
  /** Durin's egress listener, for `ctx.fetch`: `http://127.0.0.1:8081`. */
  egressUrl?: string;
  /**
   * Durin's signing key: the answer of `GET /v1/signing-key` on the admin listener, its
   * `jwk`, or `ed25519:<base64>`. When given, every request must carry a valid
   * `Durin-Signature` v3; others are answered 401.
   */
  verifyKey?: string | crypto.JsonWebKey | { jwk: crypto.JsonWebKey };
}

interface Route {
  service: string;
  handler: string;
  fn: Handler;
  options: HandlerOptions;
}

/** How far a signature's `t` may be from now. */
const MAX_SKEW_MS = 5 * 60 * 1000;

export class Endpoint {
  private readonly routes = new Map<string, Route>();
  private readonly durinUrl: URL;
  private readonly egressUrl: URL | undefined;
  private readonly key: crypto.KeyObject | undefined;

  constructor(options: EndpointOptions) {
    this.durinUrl = new URL(options.durinUrl);
    this.egressUrl = options.egressUrl ? new URL(options.egressUrl) : undefined;
    this.key = options.verifyKey === undefined ? undefined : publicKey(options.verifyKey);
  }

  /** Serves `fn` as `service`/`handler` (at `options.path`, default `/{service}/{handler}`). */
  handler<I = any, O = any>(service: string, handler: string, fn: Handler<I, O>, options: HandlerOptions = {}): this {
    const path = options.path ?? `/${service}/${handler}`;
    this.routes.set(path, { service, handler, fn, options: { ...options, path } });
    return this;
  }

  /** Serves `fn` as the workflow `name`: its handler `run`, started with `POST /v1/workflows/{name}/{id}`. */
  workflow<I = any, O = any>(name: string, fn: Handler<I, O>, options: HandlerOptions = {}): this {
    return this.handler(name, "run", fn, options);
  }

  /** The `services` of this endpoint's deployment, as `POST /v1/deployments` takes them. */
  services(defaults: HandlerOptions = {}): { name: string; handlers: Record<string, unknown>[] }[] {
    const services = new Map<string, Record<string, unknown>[]>();
    for (const route of this.routes.values()) {
      const list = services.get(route.service) ?? [];
      list.push({ ...defaults, ...route.options, name: route.handler });
      services.set(route.service, list);
    }
    return [...services].map(([name, handlers]) => ({ name, handlers }));
  }

  /** Registers this endpoint, reachable at `url`, on Durin's admin listener; answers the deployment. */
  async register(adminUrl: string, url: string, defaults: HandlerOptions = {}): Promise<any> {
    const response = await fetch(new URL("/v1/deployments", adminUrl), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ url, services: this.services(defaults) }),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`registering ${url}: Durin answered ${response.status}: ${text}`);
    return JSON.parse(text);
  }

  /** Listens on `port` (0: any free one) and resolves with the server once it listens. */
  listen(port: number, host = "127.0.0.1"): Promise<http.Server> {
    const server = http.createServer((req, res) => void this.handle(req, res));
    // Durin may keep connections open for its next attempt; keep them alive longer than it does.
    server.keepAliveTimeout = 65_000;
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => resolve(server));
    });
  }

  /** Answers one request of Durin: usable as the request listener of any node:http server. */
  async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      const body = await readBody(req);
      const path = (req.url ?? "/").split("?")[0];
      const route = this.routes.get(path);
      if (req.method !== "POST" || !route) return answer(res, 404, problem(404, "no such handler", `${req.method} ${path}`));
      if (this.key && !verifyV3(this.key, req, path, body)) {
        return answer(res, 401, problem(401, "bad signature", "Durin-Signature v3 does not verify"));
      }
      if (!req.headers["durin-invocation-id"]) return answer(res, 400, problem(400, "not a request of Durin", "no Durin-Invocation-Id"));
      let input: unknown = null;
      if (body.length > 0) {
        try {
          input = JSON.parse(body.toString("utf8"));
        } catch {
          return answer(res, 400, problem(400, "the body is not JSON", undefined));
        }
      }
      const ctx = new Context({ durinUrl: this.durinUrl, egressUrl: this.egressUrl }, req.headers, body);
      let output: unknown;
      let failure: unknown;
      try {
        output = await route.fn(ctx, input);
      } catch (error) {
        failure = error;
      }
      // A suspended attempt is over, whatever the handler did with the Suspended error.
      if (ctx.suspendedAt !== undefined || failure instanceof Suspended) {
        res.writeHead(202, { "durin-suspended": "true", "content-length": "0" });
        return void res.end();
      }
      if (failure === undefined) return answer(res, 200, output === undefined ? null : output, "application/json");
      if (failure instanceof ContinuedAsNew) return answer(res, 200, { continued_as: failure.continuedAs }, "application/json");
      if (failure instanceof Cancelled) return answer(res, 409, problem(409, "cancelled", failure.message, "urn:durin:problem:cancelled"));
      if (failure instanceof TerminalError) return answer(res, failure.status, problem(failure.status, failure.name, failure.message));
      const message = failure instanceof Error ? failure.message : String(failure);
      return answer(res, 503, problem(503, "handler failed", message));
    } catch (error) {
      // Reading the request failed (the caller went away): nothing to answer.
      if (!res.headersSent) answer(res, 503, problem(503, "handler failed", String(error)));
    }
  }
}

function readBody(req: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

function problem(status: number, title: string, detail: string | undefined, type?: string) {
  return { type: type ?? "about:blank", title, status, ...(detail === undefined ? {} : { detail }) };
}

function answer(res: http.ServerResponse, status: number, body: unknown, contentType = "application/problem+json") {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "content-type": contentType, "content-length": String(data.length) });
  res.end(data);
}

/** Durin's public key from the forms `verifyKey` takes. */
function publicKey(key: NonNullable<EndpointOptions["verifyKey"]>): crypto.KeyObject {
  if (typeof key === "string") {
    const raw = Buffer.from(key.replace(/^ed25519:/, ""), "base64");
    if (raw.length !== 32) throw new Error("verifyKey: expected 32 bytes of Ed25519 public key");
    return crypto.createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") }, format: "jwk" });
  }
  const jwk = ("jwk" in key && key.jwk ? key.jwk : key) as crypto.JsonWebKey;
  return crypto.createPublicKey({ key: jwk, format: "jwk" });
}

/**
 * Checks `Durin-Signature` v3 (NEW-CONTRACT.md §4): Ed25519 over
 * `durin-signature-v3\n{t}\n{path}\n`, then `{name}:{value}\n` for every `durin-*` header
 * but `durin-signature`, sorted by lower-cased name, then the body. Refuses a `durin-*`
 * header sent twice, a `t` more than 5 minutes from now, and a missing v3.
 */
export function verifyV3(key: crypto.KeyObject, req: http.IncomingMessage, path: string, body: Buffer): boolean {
  const seen = new Set<string>();
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i].toLowerCase();
    if (!name.startsWith("durin-")) continue;
    if (seen.has(name)) return false;
    seen.add(name);
  }
  const signature = req.headers["durin-signature"];
  if (typeof signature !== "string") return false;
  const fields = new Map(signature.split(",").map((part) => {
    const at = part.indexOf("=");
    return [part.slice(0, at).trim(), part.slice(at + 1).trim()] as [string, string];
  }));
  const t = fields.get("t") ?? "";
  const v3 = fields.get("v3");
  if (!v3 || !/^\d+$/.test(t) || !(Math.abs(Date.now() - Number(t)) <= MAX_SKEW_MS)) return false;
  const signed = [...seen].filter((name) => name !== "durin-signature").sort();
  const head = `durin-signature-v3\n${t}\n${path}\n` + signed.map((name) => `${name}:${req.headers[name]}\n`).join("");
  try {
    return crypto.verify(null, Buffer.concat([Buffer.from(head), body]), key, Buffer.from(v3, "base64url"));
  } catch {
    return false;
  }
}
