#!/usr/bin/env bash
# The demo of the Docker stack (the `demo` service of docker-compose.yml):
# creates a project on a real git repository, turns the ci_job_telemetry flag
# on for it, runs demo/.gitlab-ci.yml as a pipeline, waits for its jobs and
# prints them. The runner service takes the jobs; their traces go through the
# gateway to ClickHouse. Needs bash, curl, git and jq (the workspace image).
set -euo pipefail

api="${FAKE_RAILS_URL:?}/api/v4"
auth=(-H "PRIVATE-TOKEN: ${FAKE_RAILS_ADMIN_TOKEN:?}" -H "Content-Type: application/json")
repo="${REPOS_DIR:?}/ci-telemetry-demo-$(date +%s)"

for _ in $(seq 1 60); do
  curl -fsS "${FAKE_RAILS_URL}/-/health" >/dev/null 2>&1 && break
  sleep 1
done

git init -q -b main "$repo"
cp /demo/.gitlab-ci.yml "$repo/"
git -C "$repo" -c user.name=demo -c user.email=demo@example.invalid add .gitlab-ci.yml
git -C "$repo" -c user.name=demo -c user.email=demo@example.invalid commit -q -m "demo pipeline"

name="$(basename "$repo")"
project=$(curl -fsS "${auth[@]}" -X POST "$api/projects" \
  -d "$(jq -n --arg n "$name" --arg r "$repo" '{name: $n, path: $n, repository_path: $r}')")
project_id=$(jq -r .id <<<"$project")
project_path=$(jq -r '.path_with_namespace // .path' <<<"$project")
curl -fsS "${auth[@]}" -X POST "$api/features/ci_job_telemetry" \
  -d "$(jq -n --arg p "$project_path" '{value: true, project: $p}')" >/dev/null
pipeline_id=$(curl -fsS "${auth[@]}" -X POST "$api/projects/$project_id/pipeline" \
  -d '{"ref": "main"}' | jq -r .id)
echo "Pipeline $pipeline_id of project $project_path created; trace id $(printf '%032x' "$pipeline_id")"

for _ in $(seq 1 180); do
  jobs=$(curl -fsS "${auth[@]}" "$api/projects/$project_id/pipelines/$pipeline_id/jobs")
  if jq -e 'length > 0 and all(.status | IN("success", "failed", "canceled"))' <<<"$jobs" >/dev/null; then
    jq -r '.[] | "  \(.name): \(.status)"' <<<"$jobs"
    echo "Done. Traces: Grafana (http://localhost:3000) or"
    echo "  curl -s -u default:\$CLICKHOUSE_PASSWORD localhost:8123 --data-binary \\"
    echo "    \"SELECT SpanName, ServiceName, Duration FROM otel.otel_traces WHERE TraceId = '$(printf '%032x' "$pipeline_id")'\""
    exit 0
  fi
  sleep 1
done
echo "The pipeline did not finish in 3 minutes:" >&2
jq -r '.[] | "  \(.name): \(.status)"' <<<"$jobs" >&2
exit 1
