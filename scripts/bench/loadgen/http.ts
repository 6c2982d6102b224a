/** A keep-alive HTTP/1.1 client for the proxy: several sockets, raw bodies, a per-request timeout. */
import http from "node:http";

export interface OutgoingRequest {
  path: string;
  /** Exactly the headers to send (the signed ones and content-length). */
  headers: Record<string, string>;
  body: Buffer;
}

export interface Answer {
  status: number;
  body: Buffer;
}

export class HttpClient {
  private readonly agent: http.Agent;
  private readonly inFlight = new Set<http.ClientRequest>();
  private readonly host: string;
  private readonly port: number;

  constructor(
    url: string,
    sockets: number,
    private readonly timeoutMs = 10_000,
  ) {
    const u = new URL(url);
    this.host = u.hostname;
    this.port = Number(u.port);
    this.agent = new http.Agent({ keepAlive: true, maxSockets: sockets, maxFreeSockets: sockets });
  }

  post(req: OutgoingRequest): Promise<Answer> {
    return new Promise((resolve, reject) => {
      const r = http.request(
        {
          host: this.host,
          port: this.port,
          method: "POST",
          path: req.path,
          headers: req.headers,
          agent: this.agent,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () => resolve({ status: res.statusCode ?? 0, body: chunks.length === 1 ? chunks[0] : Buffer.concat(chunks) }));
          res.on("error", reject);
        },
      );
      this.inFlight.add(r);
      r.once("close", () => this.inFlight.delete(r));
      r.setTimeout(this.timeoutMs, () => r.destroy(new Error("timeout")));
      r.on("error", reject);
      r.end(req.body);
    });
  }

  /** Destroys every request still waiting (queued for a socket or for its answer). */
  abortAll(): void {
    for (const r of this.inFlight) r.destroy(new Error("aborted"));
    this.inFlight.clear();
  }

  close(): void {
    this.agent.destroy();
  }
}
