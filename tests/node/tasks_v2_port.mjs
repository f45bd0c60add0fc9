// A task session of @modelcontextprotocol/ext-tasks for a connected @modelcontextprotocol/client
// Client, on whatever era it negotiated. On 2026-07-28, ext-tasks sends tools/call and tasks/* itself
// ("rawDispatch"), framed with the client's envelope and the tasks extension ("v2RequestFraming"),
// as its README says for a 2026-07-28 Tasks server: the SDK's own request path would frame them
// without the extension. rawDispatch here is one plain HTTP POST per request.
import { createTaskSessionFromClient } from "@modelcontextprotocol/ext-tasks/client";

export function taskSession(client, url, token, clientInfo) {
  if (client.getProtocolEra() !== "modern") return createTaskSessionFromClient(client, { endpointId: url });
  const version = client.getNegotiatedProtocolVersion();
  return createTaskSessionFromClient(client, {
    endpointId: url,
    rawDispatch: rawDispatcher(url, token, version),
    v2RequestFraming: { protocolVersion: version, clientInfo, clientCapabilities: {} },
  });
}

// One 2026-07-28 request over HTTP, answered as ext-tasks' port wants it ({kind, result|error}).
// The routing headers are the spec's: Mcp-Method, and Mcp-Name (the tool, or the task: ext-tasks
// puts the task id in context.headers). context.requestTimeoutMs bounds each request, not the task.
function rawDispatcher(url, token, version) {
  let sent = 0;
  return async (request, options = {}) => {
    const named = request.method === "tools/call" ? request.params?.name : request.params?.taskId;
    const headers = {
      Authorization: `Bearer ${token}`,
      "Content-Type": "application/json",
      Accept: "application/json, text/event-stream",
      "MCP-Protocol-Version": version,
      "Mcp-Method": request.method,
      ...(typeof named === "string" ? { "Mcp-Name": named } : {}),
      ...(options.context?.headers ?? {}),
    };
    const timeout = options.context?.requestTimeoutMs;
    const signal = AbortSignal.any([options.signal, timeout && AbortSignal.timeout(timeout)].filter(Boolean));
    const id = `raw-${++sent}`;
    const body = JSON.stringify({ jsonrpc: "2.0", id, method: request.method, params: request.params ?? {} });
    const answer = await answerOf(await fetch(url, { method: "POST", headers, body, signal }), id);
    return "error" in answer ? { kind: "error", error: answer.error } : { kind: "result", result: answer.result };
  };
}

// The response to request `id`: the JSON body, or the SSE event that carries it.
async function answerOf(response, id) {
  const text = await response.text();
  if (!(response.headers.get("content-type") ?? "").startsWith("text/event-stream")) return JSON.parse(text);
  for (const event of text.split(/\r?\n\r?\n/)) {
    const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
    if (data.length === 0) continue;
    const message = JSON.parse(data.join("\n"));
    if (message.id === id && ("result" in message || "error" in message)) return message;
  }
  throw new Error(`HTTP ${response.status}: no answer to ${id} in the event stream`);
}
