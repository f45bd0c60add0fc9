# syntax=docker/dockerfile:1
# The approvals gateway, one process on port 8080, running as an unprivileged user.
#
#   docker build -t approvals .
#   docker run -p 127.0.0.1:8080:8080 \
#     -e APPROVALS_AGENT_TOKEN=... -e APPROVALS_REVIEWER_TOKEN=... -e APPROVALS_SESSION_SECRET=... approvals
#
# The built-in config (below) serves the bundled demo upstream under config/policy.json, keeps its
# SQLite store in the volume /var/lib/approvals, and reads every secret from the environment.
# Mount your own gateway.toml and policy files over /etc/approvals for real upstreams; set
# APPROVALS_DATABASE_URL for PostgreSQL (see docker-compose.yml) and APPROVALS_PUBLIC_URL for links.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package is built from: a change to tests or docs does not rebuild this layer.
COPY pyproject.toml README.md /src/
COPY approvals /src/approvals
RUN pip install /src && rm -rf /src

# A fixed numeric uid, so orchestrators that check runAsNonRoot can tell it is not root.
RUN groupadd --system --gid 10001 approvals \
    && useradd --system --uid 10001 --gid approvals --home-dir /var/lib/approvals \
       --shell /usr/sbin/nologin approvals \
    && install -d -o approvals -g approvals -m 0750 /var/lib/approvals

COPY config/policy.json /etc/approvals/policy.json
COPY <<'EOF' /etc/approvals/gateway.toml
# The container's default config; paths are relative to this file. Secrets come from the
# environment only: the tokens below, APPROVALS_SESSION_SECRET, APPROVALS_DATABASE_URL.
[server]
host = "0.0.0.0"
port = 8080

[store]
path = "/var/lib/approvals/approvals.db"   # unless APPROVALS_DATABASE_URL names PostgreSQL

[upstreams.demo]
command = ["python", "-m", "approvals.demo_server"]
policy = "policy.json"

[[grants]]
name = "agent"
token_env = "APPROVALS_AGENT_TOKEN"

[[reviewers]]
name = "reviewer"
token_env = "APPROVALS_REVIEWER_TOKEN"
EOF

USER 10001:10001
WORKDIR /var/lib/approvals
VOLUME ["/var/lib/approvals"]
EXPOSE 8080

# Python, not curl (the slim image has none): healthy while /healthz answers 2xx. A "degraded"
# answer (a policy edit that failed to load; the previous policy stays in force) is still healthy:
# a restart would not mend the file, and would refuse to start on it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

ENTRYPOINT ["approvals"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--config", "/etc/approvals/gateway.toml"]
