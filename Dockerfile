# The loreg registry server. Build with --build-arg EXTRAS=merge to merge on this image's CPU.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY registry registry
COPY cli cli
COPY migrations migrations
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 LOREG_HOME=/data
RUN useradd --create-home --uid 1000 loreg && mkdir /data && chown loreg /data
COPY --from=build /wheels /wheels
# the pinned CPU torch wheel first when merging here; an unpinned torch pulls a CUDA build
RUN if [ "$EXTRAS" = "merge" ]; then pip install --no-cache-dir torch==2.13.0; fi \
    && WHEEL=$(ls /wheels/loreg-*.whl) \
    && pip install --no-cache-dir "${WHEEL}${EXTRAS:+[$EXTRAS]}" \
    && rm -rf /wheels
USER loreg
VOLUME /data
EXPOSE 8080
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v1/health')"
CMD ["loreg", "serve", "--host", "0.0.0.0", "--port", "8080"]
