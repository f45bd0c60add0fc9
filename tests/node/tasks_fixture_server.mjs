// The tools the conformance suite's tasks-* scenarios ask of a server, as an initialize-era stdio
// MCP server (TypeScript SDK v1): greet (sync), slow_compute ({seconds, label}: sleeps, then
// answers), failing_job (a tool error: isError), protocol_error_job (a JSON-RPC error) and
// confirm_delete (answers at once: this fixture asks for no input).
// Behind the gateway with a policy that holds the last three, the tasks are the gateway's own.
//   node tasks_fixture_server.mjs
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { StdioServerTransport } from "@modelcontextprotocol/sdk/server/stdio.js";
import { CallToolRequestSchema, ErrorCode, ListToolsRequestSchema, McpError } from "@modelcontextprotocol/sdk/types.js";

const object = (properties = {}) => ({ type: "object", properties });
const TOOLS = [
  { name: "greet", description: "Say hello.", inputSchema: object({ name: { type: "string" } }) },
  {
    name: "slow_compute",
    description: "Wait `seconds`, then answer.",
    inputSchema: object({ seconds: { type: "number" }, label: { type: "string" } }),
  },
  { name: "failing_job", description: "Always a tool error.", inputSchema: object() },
  { name: "protocol_error_job", description: "Always a JSON-RPC error.", inputSchema: object() },
  { name: "confirm_delete", description: "Deletes nothing.", inputSchema: object({ filename: { type: "string" } }) },
];
const text = (value, isError = false) => ({ content: [{ type: "text", text: value }], isError });

const server = new Server({ name: "tasks-fixture", version: "1.0.0" }, { capabilities: { tools: {} } });
server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools: TOOLS }));
server.setRequestHandler(CallToolRequestSchema, async (request, extra) => {
  const args = request.params.arguments ?? {};
  switch (request.params.name) {
    case "greet":
      return text(`Hello, ${args.name}!`);
    case "slow_compute":
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, Number(args.seconds ?? 0) * 1000);
        extra.signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
      });
      return text(`computed ${args.label ?? ""}`);
    case "failing_job":
      return text("the job failed", true);
    case "confirm_delete":
      return text(`kept ${args.filename}`);
    case "protocol_error_job":
      throw new McpError(ErrorCode.InternalError, "the job broke down");
    default:
      throw new McpError(ErrorCode.InvalidParams, `Unknown tool: ${request.params.name}`);
  }
});
await server.connect(new StdioServerTransport());
