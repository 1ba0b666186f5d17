# The gesture service: one image for the web processes and the migrate job.
# Build a wheel, then install it into a clean stage so the source tree (and its sql/,
# which the wheel carries as service/sql) is not on sys.path beside the installed package.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app
USER app
WORKDIR /tmp
EXPOSE 8000
# The Procfile's web command; exec makes uvicorn PID 1, so it gets SIGTERM itself.
# WS_PER_MESSAGE_DEFLATE, WS_PING_INTERVAL and WS_PING_TIMEOUT are uvicorn's to apply, not
# the app's: this line is where they are read (see docs/operations.md).
CMD ["sh", "-c", "exec uvicorn service.app:app --host 0.0.0.0 --port \"${PORT:-8000}\" --http service.wsserver:HttpProtocol --ws service.wsserver:WSProtocol --ws-max-size 16384 --ws-per-message-deflate \"${WS_PER_MESSAGE_DEFLATE:-false}\" --ws-ping-interval \"${WS_PING_INTERVAL:-30}\" --ws-ping-timeout \"${WS_PING_TIMEOUT:-20}\" --no-server-header --timeout-graceful-shutdown 10 --proxy-headers --forwarded-allow-ips='*'"]
