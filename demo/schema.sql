-- The demo "legacy app" database: a small social app as a Rails monolith
-- would have left it. unilog reads it without any change to the app.
CREATE TYPE user_plan AS ENUM ('free', 'pro', 'enterprise');

CREATE TABLE IF NOT EXISTS users (
    id              bigserial PRIMARY KEY,
    email           text NOT NULL UNIQUE,
    name            text NOT NULL,
    password_digest text NOT NULL,
    plan            user_plan NOT NULL DEFAULT 'free',
    balance         numeric(12, 2) NOT NULL DEFAULT 0,
    tags            text[] NOT NULL DEFAULT '{}',
    settings        jsonb NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS user_connections (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    friend_id   bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, friend_id)
);

CREATE TABLE IF NOT EXISTS posts (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    public_id   uuid NOT NULL DEFAULT gen_random_uuid(),
    title       text NOT NULL,
    body        text NOT NULL,
    published   boolean NOT NULL DEFAULT false,
    published_on date,
    created_at  timestamp NOT NULL DEFAULT now()
);

-- A few rows that exist before unilog starts: they arrive through the
-- initial snapshot.
INSERT INTO users (email, name, password_digest, plan, balance, tags)
SELECT 'user' || g || '@example.com', 'User ' || g, md5('pw' || g),
       (ARRAY['free', 'pro', 'enterprise'])[1 + g % 3]::user_plan, g * 1.5, ARRAY['seed']
FROM generate_series(1, 20) AS g;
INSERT INTO user_connections (user_id, friend_id)
SELECT g, 1 + g % 20 FROM generate_series(1, 20) AS g WHERE g <> 1 + g % 20;
INSERT INTO posts (user_id, title, body, published, published_on)
SELECT 1 + g % 20, 'Post ' || g, repeat('words ', 20), g % 2 = 0, DATE '2024-01-01' + g
FROM generate_series(1, 30) AS g;
