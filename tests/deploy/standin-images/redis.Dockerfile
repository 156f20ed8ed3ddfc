# Stand-in for redis:7.2-alpine from Debian's redis-server (7.0): the same commands on PATH, /data
# as the working directory, and the official entrypoint's habit of turning protected mode off when
# no config file is given (without it a container refuses clients from other containers).
FROM hmt-standin/debian:bookworm
LABEL org.hmt-serve.standin="redis"
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server redis-tools \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
