# loadproof service image: orchestrator, workers, LLM simulator, k6 start barrier and report Job.
# Build: docker build -t loadproof:dev .     (kind: kind load docker-image loadproof:dev)
# Only the runtime subset of the pinned requirements (requirements-service.txt) is installed.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY requirements.txt requirements-service.txt /build/
RUN /opt/venv/bin/pip install -r /build/requirements-service.txt
WORKDIR /app
COPY service/ service/
# The one list of the image's own code: exactly the import closure of the entry points below
# (tests/test_infra_image.py computes it and fails on a file missing here or copied for nothing).
COPY loadtest/__init__.py loadtest/k6_start.py loadtest/measure.py loadtest/prom.py loadtest/report_job.py \
     loadtest/tasks.py loadtest/
COPY common/__init__.py common/k6config.py common/queries.py common/stackconfig.py common/
# Byte-compile now: the root filesystem is read-only at run time.
RUN /opt/venv/bin/python -m compileall -q /app

FROM python:3.11-slim
# Non-root, numeric uid/gid so Kubernetes can verify runAsNonRoot (pods set runAsUser 10001 too).
RUN groupadd --system --gid 10001 loadproof \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin loadproof
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOADPROOF_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080 8090 9101
# Entry points (the Pulumi program sets `command` per component):
#   python -m service.orchestrator   API           python -m service.worker        workers
#   python -m service.simulator      LLM simulator python -m loadtest.k6_start     k6 start barrier
#   python -m loadtest.report_job    report Job
CMD ["python", "-m", "service.orchestrator"]
