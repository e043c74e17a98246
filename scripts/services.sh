# Sourced by test.sh and bench.sh: makes sure PostgreSQL and Redis are installed and running,
# and exports REDIS_URL and DATABASE_URL for them.

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)  # certificates for the TLS test
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
fi

for _ in $(seq 1 100); do
  redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 0.1
done

# A fresh Debian install asks TCP clients for a password: give the postgres user one.
if ! psql "$DATABASE_URL" -Atc 'select 1' >/dev/null 2>&1; then
  echo "setting a password for the postgres role (fresh install)"
  as_root runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'"
  export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
  psql "$DATABASE_URL" -Atc 'select 1' >/dev/null
fi

