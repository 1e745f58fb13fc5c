/** A minimal HTTP/1.1 client on node:http (global `fetch` cannot send proxy-form requests). */
import * as http from "node:http";

/** One agent for the whole process: keep-alive connections to Durin and its egress. */
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

export interface RawResponse {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
}

export interface RawRequest {
  method: string;
  /** Where to connect: `http://host:port`. */
  origin: URL;
  /** The request target: a path (`/v1/...`) or, for a proxy, an absolute URL. */
  target: string;
  headers?: Record<string, string>;
  body?: Buffer;
  timeoutMs?: number;
}

/** Sends one request and reads the whole answer. Network errors reject. */
export function send(request: RawRequest): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const headers: Record<string, string> = { ...request.headers };
    if (request.body) headers["content-length"] = String(request.body.length);
    const outgoing = http.request(
      {
        agent,
        host: request.origin.hostname,
        port: request.origin.port || 80,
        method: request.method,
        path: request.target,
        headers,
        timeout: request.timeoutMs ?? 60_000,
      },
      (response) => {
        const chunks: Buffer[] = [];
        response.on("data", (chunk: Buffer) => chunks.push(chunk));
        response.on("end", () => resolve({ status: response.statusCode ?? 0, headers: response.headers, body: Buffer.concat(chunks) }));
        response.on("error", reject);
      },
    );
    outgoing.on("timeout", () => outgoing.destroy(new Error(`${request.method} ${request.target}: timed out`)));
    outgoing.on("error", reject);
    outgoing.end(request.body);
  });
}

/** The body as JSON; `null` when empty, the text itself when it is not JSON. */
export function parseJson(body: Buffer): unknown {
  if (body.length === 0) return null;
  const text = body.toString("utf8");
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}
