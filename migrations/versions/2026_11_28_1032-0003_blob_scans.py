"""blob scans

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:32:27.076550

Policy: a migration imports only alembic.op and sqlalchemy (history is frozen: never the models),
ships a working downgrade, and is tested by tests/db/test_migrations.py (one head, upgrade from
empty, downgrade/upgrade round trip, models == migrations).
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('blob_scans',
    sa.Column('digest', sa.String(length=71), nullable=False),
    sa.Column('header_size', sa.BigInteger(), nullable=False),
    sa.Column('nonfinite', sa.JSON(), nullable=False),
    sa.Column('zero', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['digest'], ['blobs.digest'], name=op.f('fk_blob_scans_digest_blobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_blob_scans'))
    )


def downgrade() -> None:
    op.drop_table('blob_scans')
