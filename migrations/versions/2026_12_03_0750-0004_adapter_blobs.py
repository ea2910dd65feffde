"""adapter blobs: blobs linked to an adapter name, the only ones its versions may reference

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 07:50:00.000000

Policy: a migration imports only alembic.op and sqlalchemy (history is frozen: never the models),
ships a working downgrade, and is tested by tests/db/test_migrations.py (one head, upgrade from
empty, downgrade/upgrade round trip, models == migrations).
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapter_blobs',
    sa.Column('namespace', sa.String(length=128), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['digest'], ['blobs.digest'], name=op.f('fk_adapter_blobs_digest_blobs'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('namespace', 'name', 'digest', name=op.f('pk_adapter_blobs'))
    )
    with op.batch_alter_table('adapter_blobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_adapter_blobs_digest'), ['digest'], unique=False)
    # existing versions keep working: each adapter is linked to every blob its versions reference
    op.execute(
        "INSERT INTO adapter_blobs (namespace, name, digest, created_at) "
        "SELECT DISTINCT a.namespace, a.name, f.digest, CURRENT_TIMESTAMP "
        "FROM version_files f JOIN versions v ON v.id = f.version_id JOIN adapters a ON a.id = v.adapter_id"
    )


def downgrade() -> None:
    with op.batch_alter_table('adapter_blobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_blobs_digest'))
    op.drop_table('adapter_blobs')
