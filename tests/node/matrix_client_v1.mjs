// The client x upstream-era matrix, TypeScript SDK v1 (@modelcontextprotocol/sdk):
//   node matrix_client_v1.mjs <url> <token> <spec-json>
// spec: {allowed: [name, args], held: name, args: {approve, deny, task}, timeoutMs}
// Runs list / allowed / approved / denied / task in turn and prints one JSON line per case
// ({case, result} or {case, error}); the test decides what each got. During the task case it prints
// {event: "past-timeout"} once the client's own request timeout has passed, so the test approves
// only then (no sleeping on the test's side).
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, specJson] = process.argv.slice(2);
const spec = JSON.parse(specJson);
const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const failure = (error) => `${error?.name ?? "Error"}${error?.code !== undefined ? ` ${error.code}` : ""}: ${error?.message ?? error}`;

async function run(name, body) {
  try {
    say({ case: name, result: await body() });
  } catch (error) {
    say({ case: name, error: failure(error) });
  }
}

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "matrix-client-v1", version: "1.0.0" });
try {
  await client.connect(transport);
} catch (error) {
  say({ case: "connect", error: failure(error) });
  process.exit(0);
}
say({ connected: "legacy", version: transport.protocolVersion ?? null });
const long = { timeout: 30000 };
await run("list", async () => ({ tools: (await client.listTools()).tools.map((t) => t.name) }));
await run("allowed", () => client.callTool({ name: spec.allowed[0], arguments: spec.allowed[1] }, undefined, long));
await run("approved", () => client.callTool({ name: spec.held, arguments: spec.args.approve }, undefined, long));
await run("denied", () => client.callTool({ name: spec.held, arguments: spec.args.deny }, undefined, long));
await run("task", async () => {
  const began = Date.now();
  const timer = setTimeout(() => say({ event: "past-timeout" }), spec.timeoutMs + 500);
  const options = { timeout: spec.timeoutMs, task: { ttl: 600000 } };
  let created = false;
  try {
    for await (const message of client.experimental.tasks.callToolStream(
      { name: spec.held, arguments: spec.args.task },
      undefined,
      options,
    )) {
      if (message.type === "taskCreated") created = true;
      else if (message.type === "result") return { ...message.result, task: created, elapsedMs: Date.now() - began };
      else if (message.type === "error") throw message.error;
    }
    throw new Error("the stream ended without a result");
  } finally {
    clearTimeout(timer);
  }
});
await client.close();
process.exit(0);
