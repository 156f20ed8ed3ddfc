# Stand-in for prom/prometheus from Debian's prometheus (2.42): the binary as the entrypoint, run as
# nobody with /prometheus as its writable data directory, and wget for the compose health check.
FROM hmt-standin/debian:bookworm
LABEL org.hmt-serve.standin="prometheus"
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
