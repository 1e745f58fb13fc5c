/**
 * Signature checks (Durin-Signature v3). Locally, with a key pair of our own: a good
 * request is accepted and each kind of forgery refused. End to end:
 * Durin's requests pass, a request Durin sent replayed as is passes, tampered ones do not.
 */
import { describe, it, before, after } from "node:test";
import * as assert from "node:assert/strict";
import * as crypto from "node:crypto";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import { Endpoint } from "../src";
import { Durin, FAST_RETRY, register, request, startDurin } from "./harness";

/** Sends a request with exactly these headers (an array value sends the header twice). */
function post(url: string, headers: Record<string, string | string[]>, body: Buffer): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = http.request({ host: u.hostname, port: u.port, path: u.pathname + u.search, method: "POST", headers: { ...headers, "content-length": body.length } }, (res) => {
      let data = "";
      res.on("data", (d) => (data += d));
      res.on("end", () => resolve({ status: res.statusCode!, body: data }));
    });
    req.on("error", reject);
    req.end(body);
  });
}

async function serve(app: Endpoint): Promise<{ url: string; server: http.Server }> {
  const server = await app.listen(0);
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, server };
}

describe("signature v3, with a key of our own", () => {
  const { publicKey, privateKey } = crypto.generateKeyPairSync("ed25519");
  let url = "";
  let server: http.Server;

  before(async () => {
    const app = new Endpoint({ durinUrl: "http://127.0.0.1:1", verifyKey: publicKey.export({ format: "jwk" }) });
    app.handler("s", "echo", async (ctx, input) => ({ input, attempt: ctx.attempt, cancelled: ctx.cancelled }));
    ({ url, server } = await serve(app));
  });
  after(() => {
    server.closeAllConnections();
    server.close();
  });

  const base = { "durin-invocation-id": "inv_0193a2b4c5d6e7f8091a2b3c4d5e6f70", "durin-attempt": "2", "durin-attempt-token": "5f0c3a9e", "content-type": "application/json" };
  const body = Buffer.from('{"amount":1}');

  /** Signs like Durin: the `durin-*` headers but the signature, sorted, then the body. */
  function sign(path: string, headers: Record<string, string>, payload: Buffer, t = Date.now()): string {
    const names = Object.keys(headers).map((n) => n.toLowerCase()).filter((n) => n.startsWith("durin-") && n !== "durin-signature").sort();
    const head = `durin-signature-v3\n${t}\n${path}\n` + names.map((n) => `${n}:${headers[n]}\n`).join("");
    const v3 = crypto.sign(null, Buffer.concat([Buffer.from(head), payload]), privateKey).toString("base64url");
    return `t=${t},v2=AAAA,v3=${v3}`;
  }

  it("accepts a good request (the query is not signed)", async () => {
    const r = await post(`${url}/s/echo?x=1`, { ...base, "durin-signature": sign("/s/echo", base, body) }, body);
    assert.equal(r.status, 200, r.body);
    assert.deepEqual(JSON.parse(r.body), { input: { amount: 1 }, attempt: 2, cancelled: false });
  });

  it("accepts a new durin-* header when it is signed", async () => {
    const headers = { ...base, "durin-workflow-id": "wf-1", "durin-cancelled": "true" };
    const r = await post(`${url}/s/echo`, { ...headers, "durin-signature": sign("/s/echo", headers, body) }, body);
    assert.equal(r.status, 200, r.body);
    assert.equal(JSON.parse(r.body).cancelled, true);
  });

  const refusals: [string, () => [string, Record<string, string | string[]>, Buffer]][] = [
    ["a tampered body", () => [`${url}/s/echo`, { ...base, "durin-signature": sign("/s/echo", base, body) }, Buffer.from('{"amount":9}')]],
    ["a tampered header", () => [`${url}/s/echo`, { ...base, "durin-attempt": "3", "durin-signature": sign("/s/echo", base, body) }, body]],
    ["an added Durin-Cancelled", () => [`${url}/s/echo`, { ...base, "durin-cancelled": "true", "durin-signature": sign("/s/echo", base, body) }, body]],
    ["a header sent twice", () => [`${url}/s/echo`, { ...base, "durin-attempt": ["2", "2"], "durin-signature": sign("/s/echo", base, body) }, body]],
    ["another path", () => [`${url}/s/echo`, { ...base, "durin-signature": sign("/s/other", base, body) }, body]],
    ["an old signature", () => [`${url}/s/echo`, { ...base, "durin-signature": sign("/s/echo", base, body, Date.now() - 6 * 60 * 1000) }, body]],
    ["no v3", () => [`${url}/s/echo`, { ...base, "durin-signature": sign("/s/echo", base, body).replace(/,v3=.*/, "") }, body]],
    ["no signature", () => [`${url}/s/echo`, { ...base }, body]],
    ["another key", () => {
      const other = crypto.generateKeyPairSync("ed25519").privateKey;
      const head = `durin-signature-v3\n${Date.now()}\n/s/echo\n`;
      const bad = crypto.sign(null, Buffer.from(head), other).toString("base64url");
      return [`${url}/s/echo`, { ...base, "durin-signature": `t=${Date.now()},v3=${bad}` }, body];
    }],
  ];
  for (const [what, make] of refusals) {
    it(`refuses ${what} with 401`, async () => {
      const [u, headers, payload] = make();
      assert.equal((await post(u, headers, payload)).status, 401);
    });
  }
});

describe("signature v3, end to end", () => {
  let durin: Durin;
  let url = "";
  let server: http.Server;
  let captured: { headers: http.IncomingHttpHeaders; body: Buffer } | undefined;

  before(async () => {
    durin = await startDurin();
    const key = (await request("GET", `${durin.admin}/v1/signing-key`)).json;
    const app = new Endpoint({ durinUrl: durin.gw, verifyKey: key });
    app.handler("s", "capture", async (ctx, input) => {
      captured ??= ctx.request;
      return { input };
    });
    ({ url, server } = await serve(app));
    await register(durin, url, app.services({ retry_policy: FAST_RETRY }));
  });
  after(async () => {
    server?.closeAllConnections();
    server?.close();
    await durin?.stop();
  });

  it("accepts Durin's requests", async () => {
    const r = await request("POST", `${durin.gw}/v1/call/s/capture`, { n: 1 });
    assert.equal(r.status, 200, r.text);
    assert.deepEqual(r.json, { input: { n: 1 } });
    assert.match(String(captured!.headers["durin-signature"]), /v3=/);
  });

  /** Durin's captured request, re-sent with `change` applied to its headers and body. */
  function resend(change: (headers: Record<string, string>, body: Buffer) => Buffer = (_, b) => b) {
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(captured!.headers)) {
      if (name === "host" || name === "content-length" || name === "connection" || value === undefined) continue;
      headers[name] = String(value);
    }
    const body = change(headers, Buffer.from(captured!.body));
    return post(`${url}/s/capture`, headers, body);
  }

  it("accepts Durin's request re-sent as it was", async () => {
    assert.equal((await resend()).status, 200);
  });

  it("refuses it with a tampered body", async () => {
    assert.equal((await resend(() => Buffer.from('{"n":2}'))).status, 401);
  });

  it("refuses it with a tampered header", async () => {
    assert.equal((await resend((h, b) => ((h["durin-attempt-token"] = "0".repeat(32)), b))).status, 401);
    assert.equal((await resend((h, b) => ((h["durin-cancelled"] = "true"), b))).status, 401);
  });

  it("a handler with the wrong key refuses Durin: the call fails with 401", async () => {
    const wrong = crypto.generateKeyPairSync("ed25519").publicKey.export({ format: "jwk" });
    const app = new Endpoint({ durinUrl: durin.gw, verifyKey: wrong });
    app.handler("s2", "echo", async (_ctx, input) => input);
    const other = await serve(app);
    try {
      await register(durin, other.url, app.services({ retry_policy: FAST_RETRY }));
      const r = await request("POST", `${durin.gw}/v1/call/s2/echo`, { n: 1 });
      assert.equal(r.status, 401, r.text);
    } finally {
      other.server.closeAllConnections();
      other.server.close();
    }
  });
});
