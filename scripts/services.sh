# Sourced by test.sh and bench.sh: makes sure PostgreSQL, Redis and MariaDB are installed and
# running, and exports REDIS_URL, DATABASE_URL and MYSQL_URL for them.

export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export MYSQL_URL="${MYSQL_URL:-mysql://root@127.0.0.1:3306/test}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v openssl >/dev/null || missing+=(openssl)  # certificates for the TLS test
[ -x /usr/sbin/mariadbd ] || missing+=(mariadb-server)
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

if ! mariadb-admin -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1; then
  echo "starting MariaDB"
  as_root mkdir -p /run/mysqld
  as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
fi

for _ in $(seq 1 100); do
  redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432 \
    && mariadb-admin -h 127.0.0.1 -P 3306 -u root ping >/dev/null 2>&1 && break
  sleep 0.1
done

# A fresh Debian install lets root in through the socket only: give it an empty password over
# TCP, and the `test` database.
if ! mariadb -h 127.0.0.1 -P 3306 -u root -e 'select 1' test >/dev/null 2>&1; then
  echo "letting root in over TCP with an empty password (fresh MariaDB install)"
  as_root mariadb -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD(''); CREATE DATABASE IF NOT EXISTS test;"
fi

# A fresh Debian install asks TCP clients for a password: give the postgres user one.
if ! psql "$DATABASE_URL" -Atc 'select 1' >/dev/null 2>&1; then
  echo "setting a password for the postgres role (fresh install)"
  as_root runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'"
  export DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/postgres"
  psql "$DATABASE_URL" -Atc 'select 1' >/dev/null
fi

