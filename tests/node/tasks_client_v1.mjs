// A TypeScript SDK v1 client that calls a tool as a task through the gateway:
//   node tasks_client_v1.mjs <url> <token> [tool] [arguments-json] [timeout-ms]
// Every message of `client.experimental.tasks.callToolStream` is printed as one JSON line, with
// the milliseconds since the call began, so that a test can wait on the client's own progress.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, tool = "send_email", args = '{"to":"a@example.com","subject":"s","body":"b"}', timeout = "2000"] =
  process.argv.slice(2);
const say = (line) => process.stdout.write(JSON.stringify(line) + "\n");

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "tasks-client-v1", version: "1.0.0" });
await client.connect(transport);
const { tools } = await client.listTools();
say({ type: "tools", taskSupport: Object.fromEntries(tools.map((t) => [t.name, t.execution?.taskSupport ?? null])) });

const began = Date.now();
const options = { timeout: Number(timeout), task: { ttl: 600000 } };
let code = 1;
for await (const message of client.experimental.tasks.callToolStream(
  { name: tool, arguments: JSON.parse(args) },
  undefined,
  options,
)) {
  const elapsedMs = Date.now() - began;
  if (message.type === "taskCreated" || message.type === "taskStatus") {
    say({ type: message.type, taskId: message.task.taskId, status: message.task.status, elapsedMs });
  } else if (message.type === "result") {
    say({ type: "result", result: message.result, elapsedMs });
    code = 0;
  } else {
    say({ type: "error", code: message.error.code, message: message.error.message, elapsedMs });
  }
}
await client.close();
process.exit(code);
