// The TypeScript SDK v2 client pinned to 2026-07-28, with ext-tasks, on one held call as a task:
//   node tasks_client_v2.mjs <url> <token> <tool> <arguments-json> [cancel]
// Prints one JSON line per step: {type: "created", taskId, kind} once the call has become a task,
// {type: "cancelled"} after its own tasks/cancel (with "cancel"), then
// {type: "outcome", status, result?, error?} when the task has settled, or {type: "error", error}.
import { Client, StreamableHTTPClientTransport } from "@modelcontextprotocol/client";
import { taskSession } from "./tasks_v2_port.mjs";

const [url, token, tool, argumentsJson, action] = process.argv.slice(2);
const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const info = { name: "tasks-client-v2", version: "1.0.0" };
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client(info, { versionNegotiation: { mode: { pin: "2026-07-28" } } });
try {
  await client.connect(transport);
  const session = taskSession(client, url, token, info);
  try {
    const execution = await session.callTool(tool, JSON.parse(argumentsJson), {
      task: { preference: "require" },
      requestTimeoutMs: 2000,
    });
    say({ type: "created", taskId: execution.handle?.taskId, kind: execution.kind });
    if (action === "cancel") {
      await execution.cancel();
      say({ type: "cancelled" });
    }
    const { outcome } = await execution.settle();
    say({
      type: "outcome",
      status: outcome.status,
      ...(outcome.status === "completed" ? { result: outcome.result } : {}),
      ...(outcome.status === "failed" ? { error: { code: outcome.error.code, message: outcome.error.message } } : {}),
    });
  } finally {
    await session.close();
  }
} catch (error) {
  say({ type: "error", error: `${error?.name}: ${error?.message ?? error}` });
}
await client.close();
process.exit(0);
