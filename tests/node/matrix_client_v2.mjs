// The client x upstream-era matrix, TypeScript SDK v2 (@modelcontextprotocol/client) with
// @modelcontextprotocol/ext-tasks for the task case:
//   node matrix_client_v2.mjs <url> <token> <spec-json>
// spec: {mode: "auto" | "legacy" | "<version>" (pinned), allowed: [name, args], held: name,
//        args: {approve, deny, task}, timeoutMs}
// Prints one JSON line per case ({case, result} or {case, error}), as matrix_client_v1.mjs does,
// plus {connected: era} and {event: "past-timeout"} once the task call has outlived the client's
// own request timeout.
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { resultFromTaskOutcome, toolDeclarationFromMcpTool } from "@modelcontextprotocol/ext-tasks/client";
import { taskSession } from "./tasks_v2_port.mjs";

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

const mode = spec.mode === "auto" || spec.mode === "legacy" ? spec.mode : { pin: spec.mode };
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "matrix-client-v2", version: "1.0.0" }, { versionNegotiation: { mode } });
try {
  await client.connect(transport);
} catch (error) {
  say({ case: "connect", error: failure(error) });
  process.exit(0);
}
say({ connected: client.getProtocolEra(), version: client.getNegotiatedProtocolVersion() ?? null });
const long = { timeout: 30000 };
await run("list", async () => ({ tools: (await client.listTools()).tools.map((t) => t.name) }));
await run("allowed", () => client.callTool({ name: spec.allowed[0], arguments: spec.allowed[1] }, long));
await run("approved", () => client.callTool({ name: spec.held, arguments: spec.args.approve }, long));
await run("denied", () => client.callTool({ name: spec.held, arguments: spec.args.deny }, long));
await run("task", async () => {
  const began = Date.now();
  const timer = setTimeout(() => say({ event: "past-timeout" }), spec.timeoutMs + 500);
  // ext-tasks calls a 2025-11-25 tool as a task only given its declaration (its execution.taskSupport);
  // at 2026-07-28 the server decides, for any tools/call that declares the extension.
  const tool = (await client.listTools()).tools.find((t) => t.name === spec.held);
  const session = taskSession(client, url, token, { name: "matrix-client-v2", version: "1.0.0" });
  try {
    const execution = await session.callTool(spec.held, spec.args.task, {
      declaration: tool === undefined ? undefined : toolDeclarationFromMcpTool(tool),
      task: { preference: "require" },
      requestTimeoutMs: spec.timeoutMs,
    });
    const { outcome } = await execution.settle();
    const result = resultFromTaskOutcome(outcome);
    return { ...result, task: execution.kind === "task", elapsedMs: Date.now() - began };
  } finally {
    clearTimeout(timer);
    await session.close();
  }
});
await client.close();
process.exit(0);
