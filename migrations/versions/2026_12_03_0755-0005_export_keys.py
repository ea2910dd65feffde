"""export keys: input names, content key, requesting token

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 07:45:00.000000

Policy: a migration imports only alembic.op and sqlalchemy (history is frozen: never the models),
ships a working downgrade, and is tested by tests/db/test_migrations.py (one head, upgrade from
empty, downgrade/upgrade round trip, models == migrations).

Backfill: each input gets the name ``ns/name:N`` of its version where the version still exists
(NULL otherwise: such an export stays readable only by tokens that cover every namespace). The old
request digest hashed exactly what the content key hashes (base, [manifest digest, weight], dtype),
so it becomes the row's content digest; it also stays its request digest, a form new requests never
produce, so an identical request later gets its own record that reuses these result files.
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('export_inputs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=160), nullable=True))
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_digest', sa.String(length=71), nullable=True))
        batch_op.add_column(sa.Column('requested_by', sa.String(length=32), nullable=True))

    op.execute(
        "UPDATE export_inputs SET name = ("
        " SELECT adapters.namespace || '/' || adapters.name || ':' || CAST(versions.number AS VARCHAR(12))"
        " FROM versions JOIN adapters ON adapters.id = versions.adapter_id"
        " WHERE versions.id = export_inputs.version_id)"
        " WHERE version_id IS NOT NULL"
    )
    op.execute("UPDATE exports SET content_digest = request_digest")

    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.alter_column('content_digest', existing_type=sa.String(length=71), nullable=False)
        batch_op.create_check_constraint(
            op.f('ck_exports_content_digest_sha256'),
            "content_digest LIKE 'sha256:%' AND length(content_digest) = 71",
        )
        batch_op.create_index(batch_op.f('ix_exports_content_digest'), ['content_digest'], unique=False)
        batch_op.create_index('ix_exports_requested_by_state', ['requested_by', 'state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('exports', schema=None) as batch_op:
        batch_op.drop_index('ix_exports_requested_by_state')
        batch_op.drop_index(batch_op.f('ix_exports_content_digest'))
        batch_op.drop_constraint(op.f('ck_exports_content_digest_sha256'), type_='check')
        batch_op.drop_column('requested_by')
        batch_op.drop_column('content_digest')
    with op.batch_alter_table('export_inputs', schema=None) as batch_op:
        batch_op.drop_column('name')
