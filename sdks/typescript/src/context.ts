/**
 * The context of one attempt: Durin's context API (`/v1/contexts/{id}/...`) and its egress,
 * called with the attempt's id, number and secret token.
 *
 * Every call is identified by its name (plain-http.md, "Names identify calls"): the first
 * call with a name records it, and every later call with that name, in this attempt or a
 * later one, answers the recorded result. A handler runs from the top on every attempt;
 * what it did before answers from the journal.
 */
import type { IncomingHttpHeaders } from "node:http";
import { send, parseJson, RawResponse } from "./http";
import { Cancelled, ContinuedAsNew, DurinError, Failure, FailureInfo, Suspended } from "./errors";

/** A duration: humantime text (`"500ms"`, `"1h 30m"`, `"30d"`) or milliseconds. */
export type Duration = string | number;

/** What a timer answers once it fired (ms since the epoch, on the gateway's clock). */
export interface SleepResult {
  wakeAtMs: number;
  firedAtMs: number;
}

/** An awakeable: hand `token` (or `resolveUrl`) to the system that completes it. */
export interface Awakeable {
  token: string;
  resolveUrl: string;
  rejectUrl: string;
  completed: boolean;
}

/** What `update.answer`/`update.fail` recorded: the first answer, the same on every attempt. */
export interface UpdateAnswer {
  value?: unknown;
  failure?: FailureInfo;
  /** An earlier call (this attempt or another) had recorded the answer: this one changed nothing. */
  replayed: boolean;
}

/**
 * An update a caller sent to this workflow's run (`POST /v1/workflows/{workflow}/{id}/updates/{name}`),
 * received at an update wait ({@link Context.update}, or {@link Member.update} in `ctx.first`).
 * The caller waits for what the handler does with it:
 *
 * - {@link Update.refuse} (validation): the caller gets that 4xx; nothing is journaled.
 * - otherwise run it (steps, state, calls: journaled as usual) and {@link Update.answer} it
 *   (the caller gets `200` and the value) or {@link Update.fail} it (the caller gets the status).
 *
 * The wait is in the journal: every later attempt receives the same update at the same wait,
 * and refusing or answering it again changes nothing. Validate deterministically.
 */
export class Update<I = unknown> {
  /** Names the update (`upd_...`): the same for a caller's retry with the same Idempotency-Key. */
  readonly updateId: string;
  readonly name: string;
  /** The caller's JSON body. */
  readonly input: I;
  readonly #call: UpdateCall;

  /** Made by the context from what the update wait answered. */
  constructor(call: UpdateCall, value: { update_id: string; name: string; input: I }) {
    this.#call = call;
    this.updateId = value.update_id;
    this.name = value.name;
    this.input = value.input;
  }

  /** Refuses the update: its caller gets `status` (a 4xx; Durin turns anything else into 400) and `message`. */
  async refuse(status: number, message: string): Promise<void> {
    await this.#call(this.updateId, "refuse", { status, message });
  }

  /** Answers the update with `value` (JSON): its caller gets `200` and the value. The first answer is journaled and wins. */
  async answer(value: unknown): Promise<UpdateAnswer> {
    return this.#call(this.updateId, "result", { value: value === undefined ? null : value });
  }

  /** Answers the update with a failure: its caller gets `status` (400 to 599; Durin makes anything else 500) and `message`. */
  async fail(status: number, message: string): Promise<UpdateAnswer> {
    return this.#call(this.updateId, "result", { failure: { status, message } });
  }
}

/** `POST updates/{update_id}/refuse` or `.../result` of the attempt's context. */
type UpdateCall = (updateId: string, what: "refuse" | "result", body: unknown) => Promise<UpdateAnswer>;

/** One member of {@link Context.first}; build them with {@link Member}. */
export type FirstMember = Record<string, unknown>;

/** Builders for the members of {@link Context.first}. Each is the same wait as the single call of that kind with that name. */
export const Member = {
  /** The next signal `name` (`key`, default the name, names the wait as in `ctx.signal`). */
  signal(name: string, options: { key?: string } = {}): FirstMember {
    return options.key === undefined ? { signal: name } : { signal: name, key: options.key };
  },
  /**
   * The next update `name` sent to this workflow's run. `key` (default: the name) names the
   * wait, as a signal wait's: to receive another update of the same name, wait with another key.
   */
  update(name: string, options: { key?: string } = {}): FirstMember {
    return options.key === undefined ? { update: name } : { update: name, key: options.key };
  },
  /** The awakeable `name` (created if it was not). */
  awakeable(name: string): FirstMember {
    return { awakeable: name };
  },
  /** The timer `name`: a duration from its first call, or a `Date` to wake at. */
  sleep(name: string, duration: Duration | Date): FirstMember {
    return { sleep: name, ...sleepBody(duration) };
  },
  /** The child call `name` (started once), as `ctx.call`. */
  call(name: string, service: string, handler: string, input: unknown, options: CallOptions = {}): FirstMember {
    return { call: name, ...callBody(service, handler, input, options) };
  },
};

/** Which member of {@link Context.first} won, and its result. */
export interface FirstResult {
  /** The winner's position in the list given to `first`. */
  index: number;
  kind: "signal" | "update" | "awakeable" | "sleep" | "call";
  name: string;
  /**
   * The signal's payload, the awakeable's or child's value, a {@link SleepResult} for a
   * sleep, the {@link Update} for an update.
   */
  value?: unknown;
  /** The update received (kind `update`): refuse it, or run and answer it. */
  update?: Update;
  /** A rejected awakeable or a failed child. */
  failure?: FailureInfo;
  /** The child's invocation id (kind `call`). */
  invocationId?: string;
  /** Every member was already in the journal. */
  replayed: boolean;
}

/** Options of a child call. */
export interface CallOptions {
  /** Start the child as this workflow id (its handler is usually `run`). */
  workflowId?: string;
  /** What happens to the child when this invocation ends first (see durin.yaml). */
  parentClose?: string;
}

/** Options of `ctx.fetch`. */
export interface FetchInit {
  method?: string;
  headers?: Record<string, string>;
  /** The body as is. */
  body?: string | Uint8Array;
  /** A JSON body (sets `content-type: application/json`). */
  json?: unknown;
  /**
   * `proxy` (default for `http:`): the absolute URL is the request target, sent to the egress.
   * `explicit` (always for `https:`): `http://EGRESS/{scheme}/{host:port}/{path}`.
   */
  form?: "proxy" | "explicit";
}

/** The downstream's answer (or the journal's, on a replay). */
export interface EgressResponse {
  status: number;
  ok: boolean;
  headers: IncomingHttpHeaders;
  body: Buffer;
  /** Answered from the journal: nothing was sent. */
  replayed: boolean;
  text(): string;
  json<T = any>(): T;
}

export interface ContextConfig {
  durinUrl: URL;
  egressUrl?: URL;
}

interface Answer {
  status: number;
  value: any;
  replayed: boolean;
}

export class Context {
  /** Names the invocation; the same on every attempt. */
  readonly invocationId: string;
  /** 1 for the first attempt, growing by one on each. */
  readonly attempt: number;
  /** The workflow id when the invocation is a workflow's run (`Durin-Workflow-Id`), else undefined. */
  readonly workflowId: string | undefined;
  /** Someone cancelled the invocation: waits that had no result throw {@link Cancelled}. */
  readonly cancelled: boolean;
  /** Durin's request as received: its headers and body. */
  readonly request: { headers: IncomingHttpHeaders; body: Buffer };
  /** Set once a wait suspended this attempt (the wait's description). */
  suspendedAt: string | undefined;

  private readonly token: string;
  private readonly config: ContextConfig;

  constructor(config: ContextConfig, headers: IncomingHttpHeaders, body: Buffer) {
    const header = (name: string) => {
      const value = headers[name];
      return Array.isArray(value) ? value[0] : value;
    };
    this.config = config;
    this.request = { headers, body };
    this.invocationId = header("durin-invocation-id") ?? "";
    this.attempt = Number(header("durin-attempt") ?? 0);
    this.token = header("durin-attempt-token") ?? "";
    this.workflowId = header("durin-workflow-id") || undefined;
    this.cancelled = header("durin-cancelled") === "true";
  }

  /**
   * A value computed once: `fn` runs only when no step `name` is recorded yet, and its
   * result (JSON) is recorded; every later attempt gets the recorded value. Use it for
   * ids, timestamps, random choices and any costly work that must not run twice.
   */
  async step<T>(name: string, fn: () => T | Promise<T>): Promise<T> {
    const path = `steps/${encodeURIComponent(name)}`;
    const got = await this.context("GET", path, undefined, `step ${name}`);
    if (got.status === 200) return got.value;
    const value = await fn();
    return (await this.context("POST", path, value === undefined ? null : value, `step ${name}`)).value;
  }

  /**
   * An HTTP call through Durin's egress: sent once and journaled; on a later attempt the
   * same call (method, URL, body, occurrence) answers from the journal. The downstream
   * gets an `Idempotency-Key` that is the same on every try. Any status of the downstream
   * is returned; a refusal of the egress itself throws {@link DurinError}.
   */
  async fetch(url: string | URL, init: FetchInit = {}): Promise<EgressResponse> {
    const egress = this.config.egressUrl;
    if (!egress) throw new Error("ctx.fetch needs the endpoint's egressUrl");
    const target = new URL(url);
    const headers: Record<string, string> = { ...init.headers };
    let body: Buffer | undefined;
    if (init.json !== undefined) {
      body = Buffer.from(JSON.stringify(init.json));
      if (!Object.keys(headers).some((h) => h.toLowerCase() === "content-type")) headers["content-type"] = "application/json";
    } else if (init.body !== undefined) {
      body = Buffer.from(init.body);
    }
    headers["durin-invocation-id"] = this.invocationId;
    headers["durin-attempt"] = String(this.attempt);
    headers["durin-attempt-token"] = this.token;
    const explicit = init.form === "explicit" || target.protocol === "https:";
    let requestTarget = target.href;
    if (explicit) {
      requestTarget = `${egress.pathname.replace(/\/$/, "")}/${target.protocol.replace(":", "")}/${target.host}${target.pathname}${target.search}`;
    } else {
      headers["host"] = target.host;
    }
    const method = (init.method ?? (body ? "POST" : "GET")).toUpperCase();
    this.checkNotSuspended();
    // The egress tries a downstream up to 3 times, 30 s each: wait longer than that.
    const answer = await send({ method, origin: egress, target: requestTarget, headers, body, timeoutMs: 120_000 });
    if (answer.headers["durin-error-source"] === "gateway") {
      throw new DurinError(`${method} ${target.href} through the egress`, answer.status, parseJson(answer.body));
    }
    return {
      status: answer.status,
      ok: answer.status >= 200 && answer.status < 300,
      headers: answer.headers,
      body: answer.body,
      replayed: answer.headers["durin-replayed"] === "true",
      text: () => answer.body.toString("utf8"),
      json: () => JSON.parse(answer.body.toString("utf8")),
    };
  }

  /** A durable timer named `name`: its wake time is fixed by the first call (a duration, or a `Date`). */
  async sleep(name: string, duration: Duration | Date): Promise<SleepResult> {
    const { value } = await this.context("POST", `sleep/${encodeURIComponent(name)}`, sleepBody(duration), `sleep ${name}`);
    return { wakeAtMs: value.wake_at_ms, firedAtMs: value.fired_at_ms };
  }

  /**
   * The payload of the signal `name`. `key` (default: the name) names the wait: to receive
   * the next signal of the same name, wait with another key. With `timeout`, the signal
   * is raced against a durable timer: `undefined` when the timeout came first (a signal's
   * own payload is never `undefined`; JSON `null` is `null`).
   */
  async signal<T = unknown>(name: string, options: { key?: string; timeout?: Duration } = {}): Promise<T | undefined> {
    const query = new URLSearchParams();
    if (options.key !== undefined) query.set("key", options.key);
    if (options.timeout !== undefined) query.set("timeout", humantime(options.timeout));
    const q = query.toString();
    const answer = await this.context("POST", `signals/${encodeURIComponent(name)}${q ? `?${q}` : ""}`, undefined, `signal ${name}`);
    return answer.status === 204 ? undefined : answer.value;
  }

  /**
   * The first of several waits to have its result (signals, updates, awakeables, sleeps,
   * child calls, built with {@link Member}); the same winner on every later attempt.
   * Suspends while none has arrived.
   */
  async first(members: FirstMember[]): Promise<FirstResult> {
    const { value, replayed } = await this.context("POST", "first", { of: members }, "first");
    let result: unknown = value.value;
    let update: Update | undefined;
    if (value.kind === "sleep" && value.value) result = { wakeAtMs: value.value.wake_at_ms, firedAtMs: value.value.fired_at_ms };
    if (value.kind === "update" && value.value) result = update = new Update((id, what, body) => this.updateCall(id, what, body), value.value);
    return {
      index: value.index,
      kind: value.kind,
      name: value.name,
      value: result,
      ...(update ? { update } : {}),
      failure: value.failure,
      invocationId: value.invocation_id,
      replayed,
    };
  }

  /**
   * Waits for the next update `name` sent to this workflow's run (the update wait `key`,
   * default the name; like a signal wait, one key receives one update: wait again with
   * another key for the next). Then refuse it, or run and answer it (see {@link Update}).
   * To take updates while waiting for something else, put {@link Member.update} in `ctx.first`.
   */
  async update<I = unknown>(name: string, options: { key?: string } = {}): Promise<Update<I>> {
    return (await this.first([Member.update(name, options)])).update as Update<I>;
  }

  /** `POST updates/{id}/refuse` or `.../result` (see {@link Update}). */
  private async updateCall(updateId: string, what: "refuse" | "result", body: unknown): Promise<UpdateAnswer> {
    const { value, replayed } = await this.context("POST", `updates/${encodeURIComponent(updateId)}/${what}`, body, `update ${updateId} ${what}`);
    if (what === "refuse") return { replayed: false };
    return value && value.failure !== undefined ? { failure: value.failure, replayed } : { value: value?.value ?? null, replayed };
  }

  /** Creates (or, later, reads) the awakeable `name`: one token whatever the attempt. Never suspends. */
  async awakeable(name: string): Promise<Awakeable> {
    const { value } = await this.context("POST", `awakeables/${encodeURIComponent(name)}`, undefined, `awakeable ${name}`);
    return { token: value.token, resolveUrl: value.resolve_url, rejectUrl: value.reject_url, completed: value.completed };
  }

  /** The value the awakeable `name` was resolved with; a rejection throws {@link Failure}. */
  async waitAwakeable<T = unknown>(name: string): Promise<T> {
    const { value } = await this.context("POST", `awakeables/${encodeURIComponent(name)}/wait`, undefined, `awakeable ${name}`);
    if (value && value.failure) throw new Failure(`awakeable ${name} was rejected`, value.failure);
    return value?.value;
  }

  /** Sets the durable state `key`, which queries read (`GET .../queries/{key}`). */
  async setState(key: string, value: unknown): Promise<void> {
    await this.context("PUT", `state/${encodeURIComponent(key)}`, value === undefined ? null : value, `state ${key}`);
  }

  /** Clears the durable state `key` (queries then answer `null`). */
  async clearState(key: string): Promise<void> {
    await this.context("DELETE", `state/${encodeURIComponent(key)}`, undefined, `state ${key}`);
  }

  /** Calls another handler (started once, named `name`) and waits for its output; its failure throws {@link Failure}. */
  async call<T = unknown>(name: string, service: string, handler: string, input: unknown, options: CallOptions = {}): Promise<T> {
    const { value } = await this.context("POST", `calls/${encodeURIComponent(name)}`, callBody(service, handler, input, options), `call ${name}`);
    if (value.failure) throw new Failure(`call ${name} (${service}/${handler}) failed`, value.failure);
    return value.value;
  }

  /** Starts another handler once without waiting for it (`delayMs` later, durably). */
  async send(name: string, service: string, handler: string, input: unknown, options: { delayMs?: number } = {}): Promise<{ invocationId: string }> {
    const body: Record<string, unknown> = { service, handler, input: input === undefined ? null : input };
    if (options.delayMs !== undefined) body.delay_ms = options.delayMs;
    const { value } = await this.context("POST", `sends/${encodeURIComponent(name)}`, body, `send ${name}`);
    return { invocationId: value.invocation_id };
  }

  /** Reports progress (any JSON); keeps an attempt with a `heartbeat_timeout` alive. */
  async heartbeat(details: unknown): Promise<void> {
    await this.context("POST", "heartbeat", details === undefined ? null : details, "heartbeat");
  }

  /** The details of the last heartbeat of any attempt of this invocation (`null`: none). */
  async lastHeartbeat<T = unknown>(): Promise<T | null> {
    const { value } = await this.context("GET", "heartbeat", undefined, "heartbeat");
    return value?.details ?? null;
  }

  /**
   * Ends this run of a workflow and starts the next with `input` and a fresh journal,
   * under the same workflow id. Never returns: the endpoint answers 200 `{"continued_as"}`.
   */
  async continueAsNew(input: unknown): Promise<never> {
    const { value } = await this.context("POST", "continue-as-new", input === undefined ? null : input, "continue-as-new");
    throw new ContinuedAsNew(value.continued_as);
  }

  private checkNotSuspended() {
    if (this.suspendedAt !== undefined) throw new Suspended(this.suspendedAt);
  }

  /** One call of the context API; reads suspension, cancellation and refusals. */
  private async context(method: string, path: string, body: unknown, what: string): Promise<Answer> {
    this.checkNotSuspended();
    const headers: Record<string, string> = { "durin-attempt": String(this.attempt), "durin-attempt-token": this.token };
    let data: Buffer | undefined;
    if (body !== undefined) {
      data = Buffer.from(JSON.stringify(body));
      headers["content-type"] = "application/json";
    }
    const base = this.config.durinUrl.pathname.replace(/\/$/, "");
    const answer: RawResponse = await send({
      method,
      origin: this.config.durinUrl,
      target: `${base}/v1/contexts/${encodeURIComponent(this.invocationId)}/${path}`,
      headers,
      body: data,
    });
    const value = parseJson(answer.body);
    if (answer.headers["durin-suspended"] === "true") {
      this.suspendedAt ??= what;
      throw new Suspended(what);
    }
    if (answer.status === 409 && (value as any)?.type === "urn:durin:problem:cancelled") {
      throw new Cancelled(`${what}: the invocation was cancelled`);
    }
    if (answer.status >= 300) throw new DurinError(what, answer.status, value);
    return { status: answer.status, value, replayed: answer.headers["durin-replayed"] === "true" };
  }
}

function humantime(duration: Duration): string {
  return typeof duration === "number" ? `${Math.max(0, Math.round(duration))}ms` : duration;
}

function sleepBody(duration: Duration | Date): Record<string, unknown> {
  if (duration instanceof Date) return { wake_at_ms: duration.getTime() };
  if (typeof duration === "number") return { duration_ms: Math.max(0, Math.round(duration)) };
  return { duration };
}

function callBody(service: string, handler: string, input: unknown, options: CallOptions): Record<string, unknown> {
  const body: Record<string, unknown> = { service, handler, input: input === undefined ? null : input };
  if (options.workflowId !== undefined) body.workflow_id = options.workflowId;
  if (options.parentClose !== undefined) body.parent_close = options.parentClose;
  return body;
}
